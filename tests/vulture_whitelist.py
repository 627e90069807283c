"""Names vulture (tests/unit/test_house.py) cannot see being used: ComfyUI, torch, diffusers or the tokenizers
library call or read them."""

_ = object
# ComfyUI's node API (V3 and the test pack's V1 node)
_.get_node_list
_.validate_inputs
_.execute
_.fingerprint_inputs
_.INPUT_TYPES
_.RETURN_TYPES
_.FUNCTION
_.NODE_CLASS_MAPPINGS
_.OUTPUT_NODE
_.hold
_.set_memory
_.compare
_.arm
_.show
# pytest fixtures that only set something up (requested by name, their value unused)
_.small_edit_references
# diffusers' ModelHook and torch's Module
_.new_forward
_.extra_repr
# diffusers VAE settings set by omni_core.vae.vae_settings, read by the VAEs' own decode
_.use_slicing
_.use_tiling
_.tile_sample_min_height
_.tile_sample_min_width
_.tile_sample_stride_width
_.tile_sample_min_size
_.tile_latent_min_size
# the tokenizers library reads the pre-tokenizer it is given
_.pre_tokenizer
# ComfyUI reads a latent format's dimensions (tools/native_models.reference_patcher sets them)
_.latent_dimensions
# called by name in a fresh ComfyUI process: tests.helpers.run_check, tools.native_files.build_native_files
_.dbcache_cases
_.zero_threshold_is_identical
_.sampler_steps
_.lora_then_cache
_.error_and_cancel_leave_nothing
_.refusals
_.teacache_window_as_easycache_reads_it
_.teacache_branch_sweep
_.write
# torch's ParallelStyle calls these on its subclasses (omni_core/parallel/tensor_parallel.py)
_._partition_linear_fn
_._apply
# cache-dit's context-parallel hooks read it (omni_core/parallel/cpu_ring.uneven_split)
_.ulysses_anything
# aiohttp calls the route handlers ComfyUI's server registers (nodes/host.py)
_.family_of_model
