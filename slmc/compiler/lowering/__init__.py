from .components import Components
from .export import example_inputs, export_decoder, io_spec, max_chunk
from .module import LoweredLM, LoweringSpec

__all__ = ["Components", "LoweredLM", "LoweringSpec", "export_decoder", "example_inputs", "io_spec", "max_chunk"]
