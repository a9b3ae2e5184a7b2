"""Jobs: multi-step work above core and the registry (compressing a fleet of fine-tunes in parallel)."""

from deltakit.jobs.fleet_compress import FleetItem, FleetOptions, FleetReport, ItemResult, compress_fleet

__all__ = ["FleetItem", "FleetOptions", "FleetReport", "ItemResult", "compress_fleet"]
