"""Requirements of a job on its instance, as an offer query and a local match."""

from __future__ import annotations

from dataclasses import dataclass, field


def normalize_gpu_name(name: str) -> str:
    """Return a GPU model in Vast.ai's API spelling (``RTX_4090`` -> ``RTX 4090``)."""
    return " ".join(name.replace("_", " ").split())


@dataclass(frozen=True)
class Hardware:
    """The parts of an offer or a rented instance that requirements bound.

    Units follow the Vast.ai API: ``cpu_ram_mb`` in MB, ``disk_gb`` in GB
    (free space for an offer, the allocation for an instance), ``dph_total``
    in US dollars per hour, ``country`` the two-letter code that ends the
    API's ``geolocation`` string.
    """

    num_gpus: int
    gpu_name: str
    cpu_cores_effective: float
    cpu_ram_mb: float
    disk_gb: float
    dph_total: float
    reliability: float
    datacenter: bool
    country: str | None


@dataclass(frozen=True)
class Requirements:
    """Bounds one job puts on the instance it runs on.

    ``gpu_names`` are in API spelling (see ``normalize_gpu_name``) and empty
    means any model. ``geolocation`` contains country codes and empty means
    anywhere. ``extra_query`` is appended verbatim to the offer query, and an
    idle instance only serves a job whose ``extra_query`` is identical,
    because an arbitrary query cannot be checked locally.
    """

    image: str
    disk_gb: float
    num_gpus: int = 1
    gpu_names: tuple[str, ...] = ()
    cpu_cores: int | None = None
    mem_mb: int | None = None
    max_price: float | None = None
    geolocation: tuple[str, ...] = ()
    datacenter_only: bool = True
    min_reliability: float = 0.0
    extra_query: str = ""
    order: str = "dph_total"
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def offer_query(self) -> str:
        """Return the offer query in the SDK's query-string syntax.

        The SDK converts units itself: ``cpu_ram`` is given in GB and sent
        in MB (vastai 1.9.1 multiplies it by 1000).
        """
        terms = [f"num_gpus>={self.num_gpus}"]
        if len(self.gpu_names) == 1:
            terms.append(f"gpu_name={_query_word(self.gpu_names[0])}")
        elif self.gpu_names:
            names = ",".join(_query_word(name) for name in self.gpu_names)
            terms.append(f"gpu_name in [{names}]")
        if self.cpu_cores is not None:
            terms.append(f"cpu_cores_effective>={self.cpu_cores}")
        if self.mem_mb is not None:
            terms.append(f"cpu_ram>={_format_number(self.mem_mb / 1000)}")
        terms.append(f"disk_space>={_format_number(self.disk_gb)}")
        if self.max_price is not None:
            terms.append(f"dph_total<={_format_number(self.max_price)}")
        if self.geolocation:
            terms.append(f"geolocation in [{','.join(self.geolocation)}]")
        if self.datacenter_only:
            terms.append("datacenter=true")
        if self.min_reliability > 0:
            terms.append(f"reliability>={_format_number(self.min_reliability)}")
        if self.extra_query:
            terms.append(self.extra_query)
        return " ".join(terms)

    def matches(self, hardware: Hardware) -> bool:
        """Return whether an instance with this hardware meets every bound.

        Image, account and ``extra_query`` are compared by the caller, which
        holds them beside the hardware.
        """
        if hardware.num_gpus < self.num_gpus:
            return False
        if self.gpu_names:
            wanted = {normalize_gpu_name(name).casefold() for name in self.gpu_names}
            if normalize_gpu_name(hardware.gpu_name).casefold() not in wanted:
                return False
        if self.cpu_cores is not None and hardware.cpu_cores_effective < self.cpu_cores:
            return False
        if self.mem_mb is not None and hardware.cpu_ram_mb < self.mem_mb:
            return False
        if hardware.disk_gb < self.disk_gb:
            return False
        if self.max_price is not None and hardware.dph_total > self.max_price:
            return False
        if self.geolocation and hardware.country not in self.geolocation:
            return False
        if self.datacenter_only and not hardware.datacenter:
            return False
        return hardware.reliability >= self.min_reliability


def _query_word(name: str) -> str:
    # The SDK's parser turns underscores back into spaces, and a bare space
    # would end the term.
    return normalize_gpu_name(name).replace(" ", "_")


def _format_number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))
