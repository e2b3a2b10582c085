"""Export a run's model physically slimmed, packed and measured: ``python -m codeq.export RUN_DIR``."""

from codeq.export.cli import export_model, export_run, load_packed
from codeq.export.packing import pack_state_dict, unpack_state_dict
from codeq.export.slim import SurgeryError, bake_quantized, slim_model

__all__ = [
    "SurgeryError",
    "bake_quantized",
    "export_model",
    "export_run",
    "load_packed",
    "pack_state_dict",
    "slim_model",
    "unpack_state_dict",
]
