"""The training benchmark's rows: each trains one stack on the shared token ids, in its own process, and measures
itself (bench/train.py runs them and prints the table).

A row's name says what it runs: the stack (seed, hf, trl, tuneforge), then its one setting, then "-qlora" for a
4-bit NF4 base: seed; hf-dynamic (per-batch padding), hf-grouped (train_sampling_strategy="group_by_length",
transformers 5's name for the old group_by_length=True); trl (SFTTrainer defaults), trl-padding-free
(padding_free=True), trl-packing (packing=True), trl-liger (padding_free=True and use_liger_kernel=True: Liger's
Triton kernels, CUDA only); tuneforge (worker.training.recipe.train, its defaults).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tests.support.reporters import RecordingReporter

BATCH = 8
LEARNING_RATE = 1e-3
MAX_SEQ_LENGTH = 1024
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class Row:
    """One row's settings, read from its name."""

    name: str

    @property
    def stack(self) -> str:
        return self.name.split("-")[0]

    @property
    def setting(self) -> str:
        """What follows the stack: dynamic, grouped, padding-free, liger, packing, or "" (the stack's defaults)."""
        return self.name.removeprefix(self.stack).removesuffix("-qlora").strip("-")

    @property
    def qlora(self) -> bool:
        return self.name.endswith("-qlora")

    @property
    def is_peer(self) -> bool:
        """Rows that tuneforge is compared with: HF Trainer and TRL (the seed recipe has its own ratio)."""
        return self.stack in ("hf", "trl")


# ---------------------------------------------------------------- measurement
def matmul_peak(dtype_name: str, device: str) -> float:
    """Best-of-5 FLOP/s of a 2048^3 matmul at `dtype_name` on `device`: bench/train.py measures it before and after a
    shape's rows, and each row's process once more after the row (its memory figures already taken)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def peak_memory_mb() -> float:
    """This process's peak RSS so far (VmHWM, or ru_maxrss where /proc is missing), or the CUDA peak allocation."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MemoryWatch:
    """Peak memory of the whole process, and of the training loop alone: at the loop's start the peak so far is
    kept and the kernel's high-water mark is reset (/proc/self/clear_refs "5"; torch.cuda.reset_peak_memory_stats),
    so the loop's figure leaves out model loading's transient copies but keeps everything still held."""

    def __init__(self) -> None:
        self.before_loop: float | None = None
        self.resettable = True

    def loop_started(self) -> None:
        import torch

        self.before_loop = peak_memory_mb()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def peaks(self) -> tuple[float, float | None]:
        """(process peak, training-loop peak or None when the high-water mark could not be reset)."""
        now = peak_memory_mb()
        if self.before_loop is None:
            return now, None
        return max(now, self.before_loop), now if self.resettable else None


def flops_per_token(model: Any, labelled_share: float) -> float:
    """Model FLOPs a LoRA step needs per real token: 2N + 2N through the frozen decoder body (forward, then activation
    gradients only: frozen weights get none), the same for the output layer at the labelled positions only (a
    position without a label needs no logits: `labelled_share` of the tokens), and 6 N_lora for the adapters.
    Counted from the layers' shapes, so a 4-bit base (two weights per stored byte) counts the same."""
    import torch

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    head_weights = head.in_features * head.out_features
    body = sum(m.in_features * m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name and m is not head)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * body + 4 * head_weights * labelled_share + 6 * lora


def validation_loss(model: Any, valid: list[Any], pad_id: int, *, bf16: bool) -> float:
    """Token-mean cross-entropy on the held-out examples' labelled tokens, the same code for every row
    (worker.training.evaluate, which never builds the full logits), at the precision the row trained in."""
    import torch

    from worker.training.evaluate import evaluate

    device = next(model.parameters()).device
    order = sorted(range(len(valid)), key=lambda i: len(valid[i].input_ids))
    plan = [[[i] for i in order[k : k + BATCH]] for k in range(0, len(order), BATCH)]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    return evaluate(model, plan, valid, pad_id=pad_id, device=device, autocast=autocast)["loss"]


# ---------------------------------------------------------------- data
@lru_cache(maxsize=4)
def tokenizer_for(model_dir: Path) -> Any:
    """One load per process and model (a 151,936-token BPE takes a second or two to load)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_token_ids(path: Path, model_dir: Path, *, train_on_inputs: bool, limit: int | None = None) -> list[Any]:
    """tuneforge's own tokenisation and loss mask, so every row trains on identical token ids and labels."""
    from worker.training.data import load_examples

    examples = load_examples(path, tokenizer_for(model_dir), max_seq_length=MAX_SEQ_LENGTH,
                             train_on_inputs=train_on_inputs, reporter=RecordingReporter())
    return examples[:limit] if limit else examples


# ---------------------------------------------------------------- rows
@dataclass
class TimedReporter(RecordingReporter):
    """A tuneforge row's clock: wall and CPU time from the "training ..." event (the timed span starts right after
    it; `on_start` runs then) to the last step's metrics, and when each later event came (`since_start`)."""

    on_start: Callable[[], None] | None = None
    started: float = 0.0
    finished: float = 0.0
    cpu_started: float = 0.0
    cpu_finished: float = 0.0
    since_start: dict[str, float] = field(default_factory=dict)  # event message -> seconds after the start

    def event(self, message: str, **kwargs: Any) -> None:
        super().event(message, **kwargs)
        if message.startswith("training "):
            if self.on_start is not None:
                self.on_start()
            self.started, self.cpu_started = time.perf_counter(), time.process_time()
        elif self.started:
            self.since_start.setdefault(message, time.perf_counter() - self.started)

    def metrics(self, data: dict[str, Any]) -> None:
        super().metrics(data)
        self.finished, self.cpu_finished = time.perf_counter(), time.process_time()


def run_tuneforge(row: Row, model_dir: Path, train_file: Path, work: Path, *, train_on_inputs: bool,
                  limit: int | None, bf16: bool) -> dict[str, Any]:
    from peft import PeftModel

    from app.schemas.training import TrainingConfig
    from worker.training.recipe import train

    if limit:
        lines = train_file.read_text().splitlines()[:limit]
        train_file = work / "train-subset.jsonl"
        train_file.write_text("\n".join(lines) + "\n")
    config = TrainingConfig.model_validate({
        "adapter": {"type": "qlora" if row.qlora else "lora", **LORA}, "n_epochs": 1, "batch_size": BATCH,
        "learning_rate": LEARNING_RATE, "lr_scheduler": "linear", "max_seq_length": MAX_SEQ_LENGTH,
        "precision": "bf16" if bf16 else "fp32", "seed": 42, "train_on_inputs": train_on_inputs,
        # The peers' QLoRA recipe checkpoints activations (prepare_model_for_kbit_training): the same here.
        "gradient_checkpointing": row.qlora,
    })
    watch = MemoryWatch()

    reporter = TimedReporter(on_start=watch.loop_started)
    result = train(config, model_path=model_dir, train_file=train_file, validation_file=None,
                   output_dir=work / row.name, reporter=reporter)
    peak_mb, loop_mb = watch.peaks()  # before the evaluation below loads the model again
    # train() returns paths, not the model: the adapter goes back on the same base the peers evaluate on.
    model = PeftModel.from_pretrained(_base_model(model_dir, qlora=row.qlora, bf16=bf16), result.final_dir)
    losses = reporter.losses()
    return {"seconds": reporter.finished - reporter.started,
            "cpu_seconds": reporter.cpu_finished - reporter.cpu_started, "steps": result.steps,
            "real_tokens": result.trained_tokens, "train_loss": sum(losses[-2:]) / len(losses[-2:]),
            "masked_loss": None, "model_for_eval": model, "peak_mb": peak_mb, "loop_mb": loop_mb}


def _base_model(model_dir: Path, *, qlora: bool, bf16: bool) -> Any:
    """The base model as every peer loads it: frozen weights in the compute dtype (bf16 or fp32; the adapters PEFT
    adds are fp32), or NF4 with double quantisation computing in that dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": "cuda" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.to("cuda") if cuda and not qlora else model


def _peft_model(model_dir: Path, *, qlora: bool, bf16: bool) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = _base_model(model_dir, qlora=qlora, bf16=bf16)
    if qlora:  # turns gradient checkpointing on, as QLoRA recipes do
        model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                            target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))


def _training_args(work: Path, row: Row, batch: int, *, bf16: bool) -> dict[str, Any]:
    import torch

    return dict(output_dir=str(work / row.name), per_device_train_batch_size=batch, num_train_epochs=1,
                learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                seed=42, data_seed=42, bf16=bf16, dataloader_num_workers=0,
                use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU unless told it is one
                disable_tqdm=True, remove_unused_columns=False,
                # Stated for every row: TRL's own default is True, tuneforge's (and HF's) False; QLoRA rows all on.
                gradient_checkpointing=row.qlora,
                train_sampling_strategy="group_by_length" if row.setting == "grouped" else "random")


def _trainer_result(trainer: Any, output: Any, cpu_seconds: float, watch: MemoryWatch, real_tokens: int,
                    masked: list[float] | None = None) -> dict[str, Any]:
    peak_mb, loop_mb = watch.peaks()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": output.metrics["train_runtime"], "cpu_seconds": cpu_seconds,
            "steps": trainer.state.global_step, "real_tokens": real_tokens,
            "train_loss": sum(losses[-2:]) / len(losses[-2:]),
            "masked_loss": sum(masked[-2:]) / len(masked[-2:]) if masked else None,
            "model_for_eval": trainer.model, "peak_mb": peak_mb, "loop_mb": loop_mb}


def run_hf(row: Row, model_dir: Path, train: list[Any], work: Path, *, bf16: bool) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, default_data_collator

    tokenizer = tokenizer_for(model_dir)
    model = _peft_model(model_dir, qlora=row.qlora, bf16=bf16)
    ids = [e.input_ids for e in train]
    masked: list[float] = []
    if row.stack == "seed":
        # The seed recipe: pad the whole dataset to its longest example; labels are a copy of input_ids.
        padded = tokenizer.pad({"input_ids": ids}, padding=True)
        dataset = Dataset.from_dict({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                                     "labels": padded["input_ids"]})
        collator = default_data_collator
    else:
        dataset = Dataset.from_dict({"input_ids": ids, "labels": [e.labels for e in train]})
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    class SeedTrainer(Trainer):
        """Also records the loss over real tokens only (no gradient), to set beside the naive loss."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                labels = inputs["labels"].masked_fill(inputs["attention_mask"] == 0, -100)[:, 1:]
                logits = outputs.logits[:, :-1].float()
                masked.append(float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)))
            return (loss, outputs) if return_outputs else loss

    trainer_class = SeedTrainer if row.stack == "seed" else Trainer
    trainer = trainer_class(model=model, args=TrainingArguments(**_training_args(work, row, BATCH, bf16=bf16)),
                            train_dataset=dataset, data_collator=collator, processing_class=tokenizer)
    watch = MemoryWatch()
    watch.loop_started()
    cpu_started = time.process_time()
    output = trainer.train()
    return _trainer_result(trainer, output, time.process_time() - cpu_started, watch, sum(len(x) for x in ids),
                           masked)


def run_trl(row: Row, model_dir: Path, train: list[Any], work: Path, *, bf16: bool) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _peft_model(model_dir, qlora=row.qlora, bf16=bf16)
    ids = [e.input_ids for e in train]
    real = sum(len(x) for x in ids)
    packing, liger = row.setting == "packing", row.setting == "liger"
    padding_free = row.setting == "padding-free" or liger  # Liger's row adds its kernels to the best TRL setting
    steps = math.ceil(len(ids) / BATCH)
    # Packed rows are up to 1024 tokens: take as many per step as gives the unpacked run's step count.
    batch = max(1, math.ceil(math.ceil(real / MAX_SEQ_LENGTH) / steps)) if packing else BATCH
    # padding_free without packing refuses a max_length (it would not be enforced): the ids are already truncated.
    args = SFTConfig(**_training_args(work, row, batch, bf16=bf16), packing=packing, padding_free=padding_free,
                     max_length=None if padding_free else MAX_SEQ_LENGTH, use_liger_kernel=liger)
    # Pre-tokenised input_ids with labels (-100 on the prompt): the form TRL's own completion_only_loss and
    # assistant_only_loss preparation produces, which it then uses as given.
    dataset = Dataset.from_dict({"input_ids": ids, "labels": [e.labels for e in train]})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer_for(model_dir))
    if not packing:
        prepared = trainer.train_dataset
        assert sum(len(x) for x in prepared["input_ids"]) == real, "TRL changed the token ids"
        assert list(prepared["labels"]) == [e.labels for e in train], "TRL changed the loss mask"
    if row.qlora:
        # SFTTrainer casts a quantized model's adapters to bf16 (the QLoRA paper's advice); every other row keeps
        # them in fp32 (the optimizer is created later, in train(), so it sees these tensors).
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    watch = MemoryWatch()
    watch.loop_started()
    cpu_started = time.process_time()
    output = trainer.train()
    return _trainer_result(trainer, output, time.process_time() - cpu_started, watch, real)


def run_row(name: str, model_dir: str, train_file: str, work: str, *, train: list[Any], valid: list[Any], pad_id: int,
            train_on_inputs: bool, qlora_limit: int, bf16: bool = False) -> dict[str, Any]:
    """Train one row on `train` (tuneforge's tokenisation, done once by the caller: no row holds a tokenizer it would
    not hold anyway) and measure it; bench/train.py calls this in a process of its own unless --in-process."""
    import torch


    row, model_path, root = Row(name), Path(model_dir), Path(work)
    torch.manual_seed(42)
    limit = qlora_limit if row.qlora else None
    train = train[:limit] if limit else train
    if row.stack == "tuneforge":
        out = run_tuneforge(row, model_path, Path(train_file), root, train_on_inputs=train_on_inputs, limit=limit,
                            bf16=bf16)
    elif row.stack == "trl":
        out = run_trl(row, model_path, train, root, bf16=bf16)
    else:
        out = run_hf(row, model_path, train, root, bf16=bf16)
    real = sum(len(e.input_ids) for e in train)
    assert out["real_tokens"] == real, f"{name} trained {out['real_tokens']} real tokens, not {real}"
    labelled = sum(1 for e in train for label in e.labels[1:] if label != -100)
    model = out.pop("model_for_eval")
    out["labelled_tokens"] = labelled
    out["flops_per_token"] = flops_per_token(model, labelled / real)
    out["valid_loss"] = validation_loss(model, valid, pad_id, bf16=bf16)
    out["matmul_peak"] = matmul_peak("bfloat16" if bf16 else "float32", next(model.parameters()).device.type)
    out["status"] = "ok"
    return out


def run_row_process(conn: Any, kwargs: dict[str, Any], memory_limit: int | None) -> None:
    """A spawned process's entry point: run_row under an address-space limit for private data (RLIMIT_DATA, what the
    tensors' allocations count against), and send back its figures or why it stopped."""
    import traceback

    if memory_limit:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    try:
        result = run_row(**kwargs)
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "can't allocate memory" not in str(exc):
            traceback.print_exc()
            result = {"status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
        else:
            limit = f"the {memory_limit / 2**30:.1f} GiB limit" if memory_limit else "the machine's memory"
            result = {"status": f"out of memory (over {limit})", "oom_message": str(exc)[:300]}
    except Exception as exc:  # reported in the table and by the CI test (which requires every row's "ok")
        traceback.print_exc()
        result = {"status": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
    conn.send(result)
    conn.close()
