"""A local Vast.ai marketplace: the REST API on 127.0.0.1, instances as SSH hosts."""

from vastai_pool.sandbox.fault_script import FaultScriptError, ScriptedFaults
from vastai_pool.sandbox.faults import BootFault, FaultHooks, Reply
from vastai_pool.sandbox.service import Sandbox

__all__ = [
    "BootFault",
    "FaultHooks",
    "FaultScriptError",
    "Reply",
    "Sandbox",
    "ScriptedFaults",
]
