"""The self-tests' one piece of process state. pytester's in-process runs drop, when each ends, the modules it imported
first. Some register C++ operators when imported (torch's functional collectives and DTensor, both imported with
transformers' model classes), and a second import cannot register them again ("Only a single TORCH_LIBRARY can be used
to register the namespace c10d_functional"). Imported here, before any in-process run, they are never among those
modules: without it, test_plugin.py or test_reuse.py run before test_sweep.py alone left its tests that load a model
failing."""

from transformers import MistralForCausalLM  # noqa: F401
