"""Loading the base model and wrapping it for the chosen adapter type.

Hardware and precision are checked before any weights load, so an impossible job fails in a second
with the remedy in the message instead of after minutes of loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from app.schemas.training import AdapterConfig, Precision, TrainingConfig

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def pick_device(local_rank: int = 0) -> torch.device:
    """This process's CUDA device (one per process in a multi-process run) if there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"process {local_rank} needs GPU {local_rank} but this machine has "
                         f"{torch.cuda.device_count()}; ask for fewer processes")
    return torch.device("cuda", local_rank)


def cpu_bf16() -> Literal["native", "emulated", "none"]:
    """How this CPU computes bf16 products: "native" with bf16 instructions (AVX512-BF16 or AMX on x86, BF16 on
    Arm), "emulated" where oneDNN converts on AVX-512 (fp32 speed at best), "none" where torch falls back to plain
    loops (AVX2 and older: a 2048^3 product ran at 0.3 GFLOP/s against fp32's 185 on an AMD EPYC)."""
    import torch

    caps = torch.cpu.get_capabilities()
    if caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16"):
        return "native"
    if caps.get("avx512_bw") and caps.get("avx512_vl") and caps.get("avx512_dq"):
        return "emulated"
    return "none"


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """Turn the config's precision into a dtype for `device`; ValueError with the remedy if impossible.

    "auto" is bf16 where the device computes it natively (a GPU with bf16, a CPU with bf16 instructions), fp16 on
    an older GPU, and fp32 on any other CPU."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16() == "native" else torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ValueError('precision "fp16" is not supported on CPU; use "fp32" (or "auto") or run on a GPU')
    if precision == "bf16" and device.type == "cpu" and cpu_bf16() == "none":
        raise ValueError(
            f'precision "bf16" needs a CPU with bf16 or AVX-512 instructions, and this one '
            f'({torch.cpu.get_capabilities().get("cpu_name") or "unknown"}) has neither: its bf16 products would run '
            'hundreds of times slower than fp32; use "fp32" or "auto" (fp32 on this CPU), or run on a GPU'
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f'precision "bf16" is not supported by {torch.cuda.get_device_name(device)}; '
            'use "fp16" or "auto" (picks fp16 there), or a GPU with bf16 (Ampere or newer)'
        )
    return getattr(torch, _DTYPES[precision])


def check_quantization_support() -> None:
    """ValueError with the remedy when bitsandbytes cannot run 4-bit layers here (QLoRA)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers.integrations import validate_bnb_backend_availability

        validate_bnb_backend_availability(raise_exception=True)
    except Exception as exc:  # ImportError, or bitsandbytes' own "no backend" RuntimeError
        raise ValueError(
            f'adapter type "qlora" needs a working bitsandbytes on this machine ({exc}); '
            'install bitsandbytes>=0.50 for this device, or use adapter type "lora"'
        ) from exc


def _from_pretrained(model_path: Path, kwargs: dict) -> PreTrainedModel:
    """transformers' from_pretrained, with the weights read by worker/training/weights.py instead of mapped (a
    load then peaks at the loaded model's size, not that plus the file's). A model that ships its own Python
    (trust_remote_code), or whose checkpoint the reader does not cover, is loaded by transformers alone."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    from worker.training.weights import read_checkpoint

    if not kwargs["trust_remote_code"]:
        with read_checkpoint(model_path) as state_dict:
            config = None if state_dict is None else AutoConfig.from_pretrained(model_path, local_files_only=True)
            if config is not None and type(config) in AutoModelForCausalLM._model_mapping:
                model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
                rest = {k: v for k, v in kwargs.items() if k not in ("use_safetensors", "local_files_only")}
                model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **rest)
                # Where the model came from, as transformers records it when it reads the folder itself (peft writes
                # it into adapter_config.json, and looks there for the base's config when it saves an adapter).
                model.config.name_or_path = model.name_or_path = str(model_path)
                if model.can_generate():  # the folder's generation_config.json, as transformers' loading reads it
                    model.adjust_generation_fn(None, False, False, str(model_path), cache_dir=None,
                                               force_download=False, proxies=None, local_files_only=True, token=None,
                                               revision=None, subfolder="", trust_remote_code=False)
                return model
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def load_model(
    config: TrainingConfig,
    model_path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    init_adapter: Path | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel | PeftModel:
    """Load the local base model and make only the intended parameters trainable.

    With `init_adapter` (continued training) that PEFT adapter is loaded trainable onto the base instead
    of a fresh one; its own LoraConfig is used, with the job's dropout (how it trains from here).
    """
    import torch
    from transformers import BitsAndBytesConfig

    adapter = config.adapter
    kwargs: dict = {
        "use_safetensors": True,
        # Runs Python shipped with the model: only when the operator enabled it for this catalogue entry.
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
        "attn_implementation": "sdpa",
        # Full fine-tunes keep fp32 master weights and train under autocast; adapters leave the frozen
        # base in the compute dtype (half the memory) and keep their own weights in fp32.
        "dtype": torch.float32 if adapter.type == "full" else dtype,
    }
    if adapter.type == "qlora":
        quant = adapter.quantization
        assert quant is not None  # AdapterConfig fills it in for qlora
        compute = dtype if quant.compute_dtype == "auto" else resolve_precision(quant.compute_dtype, device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device}
    model = _from_pretrained(model_path, kwargs)
    if adapter.type != "qlora":
        model.to(device)  # type: ignore[arg-type]  # transformers' stub for .to is too narrow
    model.config.use_cache = False  # a KV cache is useless in training and disables packed masks
    if device.type == "cpu" and dtype != torch.float32:
        # In fp32 the block attention was no faster than SDPA's kernel (worker/training/attention.py).
        from worker.training.attention import use_block_attention

        use_block_attention(model)
    from worker.training.swiglu import use_fused_swiglu

    use_fused_swiglu(model)  # fewer fresh [positions, intermediate] buffers, bit-identical (measured on a CPU)
    from worker.training.checkpointing import enable_checkpointing

    if adapter.type == "full":
        if init_adapter is not None:
            raise ValueError("continued training from an adapter needs an adapter type (lora, qlora or dora), not full")
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        model.requires_grad_(True)
        return model

    from peft import get_peft_model

    if adapter.type == "qlora":
        # QLoRA is LoRA on a 4-bit base, and is set up as LoRA is: peft's prepare_model_for_kbit_training is not
        # used, because it casts every unquantized weight to fp32. The embedding and output layer are frozen and most
        # of a small model's unquantized weights (in fp32 a 151,936 x 896 table is 272 MB more than in bf16, and
        # autocast cast the output layer back for every chunk of logits); fp32 norms made every decoder layer's
        # input fp32, for each 4-bit and adapter product to cast back (docs/benchmarks.md, issue 18).
        keep_4bit_layout_trainable(model)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
        # The frozen embeddings produce no grad; checkpointed blocks need an input that requires one.
        model.enable_input_require_grads()
    if init_adapter is not None:
        from peft import PeftConfig, PeftModel

        saved = PeftConfig.from_pretrained(str(init_adapter))
        saved.lora_dropout = adapter.dropout  # type: ignore[attr-defined]  # a LoraConfig
        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, config=saved)
    else:
        peft_model = get_peft_model(model, lora_config(adapter))
    if dtype != torch.float32:
        keep_adapter_inputs_in_compute_dtype(peft_model)
    from worker.training.dropout import use_packed_dropout

    use_packed_dropout(peft_model)  # torch's CPU dropout draws each element's mask on its own
    return peft_model


def keep_adapter_inputs_in_compute_dtype(model: PeftModel) -> None:
    """peft casts each adapted layer's input to the adapter's dtype (fp32 here) before the adapter's two small
    products; under autocast, where a bf16 or fp16 job always runs, those products run in the compute dtype anyway,
    so the cast was a round trip of every adapted layer's input (and of its gradient) for nothing. Without it a bf16
    forward and backward of qwen2-152k's decoder with all-linear LoRA took 0.76-0.79 s instead of 0.82-0.88 s
    (docs/benchmarks.md, issue 18). The adapter's weights stay fp32."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010 - a peft layer's flag, not in torch's stub


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel during evaluation.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights the first time it runs in
    eval mode and never unpacks them when training resumes; the repacked kernel has no backward, so every
    step after the first evaluation would train on silently wrong gradients. Evaluation stays on the
    trainable layout instead (slower on those CPUs, correct everywhere).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The suffixes "all-linear" resolves to: every linear layer's name except the output head."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith("base_layer"):
            continue
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) or type(layer).__name__.startswith("Linear"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head", ""})


def adapter_differences(adapter: AdapterConfig, saved: dict[str, Any], *, all_linear: list[str]) -> list[str]:
    """Settings of the job's adapter that differ from a saved adapter_config.json ("r: 16 -> 8", ...).

    `all_linear` is what "all-linear" means for this model (see linear_module_names).
    """
    wanted = lora_config(adapter)
    pairs = {
        "r": (wanted.r, saved.get("r")),
        "alpha": (wanted.lora_alpha, saved.get("lora_alpha")),
        "use_rslora": (wanted.use_rslora, saved.get("use_rslora", False)),
        "use_dora": (wanted.use_dora, saved.get("use_dora", False)),
    }
    differences = [f"{name}: {job!r} -> {used!r}" for name, (job, used) in pairs.items() if job != used]
    def resolve(targets: Any) -> list[str]:
        # peft saves "all-linear" resolved to full module paths (model.layers.0.mlp.up_proj): compare suffixes.
        return all_linear if targets == "all-linear" else sorted({t.rsplit(".", 1)[-1] for t in targets or []})

    job_targets, used_targets = resolve(adapter.target_modules), resolve(saved.get("target_modules"))
    if job_targets != used_targets:
        differences.append(f"target_modules: {job_targets} -> {used_targets}")
    return differences


def lora_config(adapter: AdapterConfig) -> LoraConfig:
    """The peft LoraConfig for a lora / dora / qlora adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # annotated int, used as a float scale
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_rslora=adapter.use_rslora,
        use_dora=adapter.type == "dora",
        task_type="CAUSAL_LM",
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
