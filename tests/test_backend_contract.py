"""forge_mlx and forge_cuda mirror each other file for file (DESIGN.md): same modules, same public functions.

Per backend (skipped when its framework is not installed): every module of the interface imports and
defines the shared public names, and the entry points forge_core calls take the same parameters.
With both installed: the public names differ only by the backend-specific helpers listed below.
"""

import importlib
import importlib.util
import inspect

import pytest

if importlib.util.find_spec("mlx") is not None:
    import forge_mlx  # noqa: F401  (first: its BLAS preload must precede mlx.core)

PACKAGES = {"mlx": ("forge_mlx", "mlx"), "cuda": ("forge_cuda", "torch")}

# The shared interface: public functions and classes DEFINED in each file (re-exports do not count).
INTERFACE = {
    "model": {"compute_dtype", "load_base", "build_model", "adapter_config", "save_adapter", "adapter_dir_of",
              "load_adapter_dir", "load_adapted", "count_params"},
    "quant": {"default_matmul", "QuantLinear", "quantize_linear", "quantizable", "quantize_rest", "weight_bytes"},
    "lora": {"LoRALinear", "target_paths", "adapt_model", "trainable_params", "load_trainable", "factors_to_flat",
             "flat_to_factors"},
    "losses": {"token_logps", "sft_loss", "sequence_logps", "dpo_loss"},
    "objectives": {"SFTObjective", "DPOObjective", "build"},
    "checkpoint": {"save_checkpoint", "load_checkpoint"},
    "trainer": {"make_optimizer", "checkpoint_blocks", "train", "set_memory_limit"},
    "generate": {"densify_for_cpu", "complete", "generate", "heldout_loss", "evaluate", "evaluate_preferences"},
    "packing": {"enable_packing", "segment_mask", "packed_logits"},
}

# Public names only one backend has, and why.
ONLY = {
    "mlx": {
        "quant": {"unpack_affine": "MLX's packed affine layout unpacked with byte ops: the CPU dequant path's "
                                   "faster mx.dequantize; bitsandbytes dequantizes in its own kernels"},
        "packing": {"Positions": "mx.fast.rope takes one offset per row: forge_mlx wraps RoPE with per-token "
                                 "positions; transformers models take position_ids themselves",
                    "PositionRoPE": "(see Positions)",
                    "packed_hidden": "the hidden states alone, so the SFT loss runs the vocabulary head only at "
                                     "trained positions (forge_mlx/head.py, a CPU speed measure)"},
    },
    "cuda": {
        "model": {"device": "torch places tensors explicitly (cuda or cpu)",
                  "quant_meta": "forge.json's bitsandbytes quantization record"},
        "quant": {"QuantLinear8bit": "bitsandbytes' int8 layer is a separate class",
                  "quant_kind": "maps quant.bits/mode to a bitsandbytes format, refusing MLX-only ones",
                  "is_quantized": "two bitsandbytes layer classes to test for",
                  "set_module": "torch has no update_modules(tree)"},
        "lora": {"num_blocks": "HF models keep the block count in config, not in model.layers",
                 "tensors_to_flat": "canonical (A, B) <-> trainable names (PEFT-shaped)",
                 "flat_to_tensors": "canonical (A, B) <-> trainable names (PEFT-shaped)"},
        "objectives": {"to_device": "numpy batch -> tensors on the model's device"},
        "trainer": {"lr_schedule": "torch has no mlx-style schedule objects; the same formulas by hand",
                    "train_step": "one optimizer step (backward per micro-batch), also used by tests",
                    "peak_memory": "CUDA allocator peak or CPU max RSS (mlx has mx.get_peak_memory)"},
    },
}

# Entry points called by forge_core (launch.py) or shared code: parameter names and order must match.
SIGNATURES = {
    "trainer": ["train", "checkpoint_blocks", "set_memory_limit"],
    "generate": ["generate", "evaluate", "complete", "heldout_loss", "densify_for_cpu", "evaluate_preferences"],
    "packing": ["enable_packing", "segment_mask", "packed_logits"],
    "model": ["compute_dtype", "build_model", "save_adapter", "adapter_dir_of", "load_adapter_dir", "load_adapted",
              "count_params"],
    "losses": ["token_logps", "sft_loss", "sequence_logps", "dpo_loss"],
    "checkpoint": ["save_checkpoint", "load_checkpoint"],
    "objectives": ["build"],
    "lora": ["target_paths", "trainable_params", "load_trainable", "factors_to_flat", "flat_to_factors"],
}


def _module(backend: str, part: str):
    package, framework = PACKAGES[backend]
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    return importlib.import_module(f"{package}.{part}")


def public(module) -> set[str]:
    return {name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__ == module.__name__}


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("backend", sorted(PACKAGES))
@pytest.mark.parametrize("part", sorted(INTERFACE))
def test_backend_defines_the_shared_interface(backend, part):
    module = _module(backend, part)
    assert INTERFACE[part] <= public(module), f"{module.__name__} lacks {sorted(INTERFACE[part] - public(module))}"
    extra = public(module) - INTERFACE[part] - set(ONLY[backend].get(part, {}))
    assert not extra, f"{module.__name__}: public {sorted(extra)} is in neither the interface nor ONLY[{backend!r}]"


@pytest.mark.parametrize("part", sorted(INTERFACE))
def test_both_backends_expose_the_same_functions(part):
    mlx, cuda = _module("mlx", part), _module("cuda", part)
    assert public(mlx) - set(ONLY["mlx"].get(part, {})) == public(cuda) - set(ONLY["cuda"].get(part, {}))


@pytest.mark.parametrize("part", sorted(SIGNATURES))
def test_entry_points_take_the_same_parameters(part):
    mlx, cuda = _module("mlx", part), _module("cuda", part)
    for name in SIGNATURES[part]:
        assert params(getattr(mlx, name)) == params(getattr(cuda, name)), f"{part}.{name}"


@pytest.mark.parametrize("backend", sorted(PACKAGES))
def test_launch_calls_match_the_signatures(backend):
    """forge_core.launch calls train(cfg, kind=, resume=, console=, memory_limit=), generate(model=, adapter=, prompt=, system=,
    max_tokens=, temp=) and evaluate(cfg, adapter=)."""
    trainer, gen = _module(backend, "trainer"), _module(backend, "generate")
    assert {"cfg", "kind", "resume", "console", "memory_limit"} <= set(params(trainer.train))
    assert params(gen.generate) == ["model", "adapter", "prompt", "system", "max_tokens", "temp"]
    assert params(gen.evaluate)[:2] == ["cfg", "adapter"]
