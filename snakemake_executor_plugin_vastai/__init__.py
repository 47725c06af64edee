"""Snakemake executor plugin: run jobs on a warm pool of Vast.ai instances."""

from snakemake_executor_plugin_vastai.executor import Executor
from snakemake_executor_plugin_vastai.settings import ExecutorSettings, common_settings

__all__ = ["Executor", "ExecutorSettings", "common_settings"]
