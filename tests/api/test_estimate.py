"""POST /v1/fine_tuning/jobs/estimate, the memory model behind it, and creation refusing a job no worker fits."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import FineTuningJob, RegisteredModel
from app.schemas.training import LOGP_CHUNK_TOKENS, AdapterConfig, TrainingConfig, forward_tokens, vocab_block_rows
from app.services import workers as worker_service
from app.services.estimates import GIB, peak_memory
from tests.api.conftest import upload_chat

# Llama-2-7B's shape.
SEVEN_B = {"parameters": 6_738_415_616, "hidden_size": 4096, "layers": 32, "vocab_size": 32000,
           "intermediate_size": 11008, "attention_heads": 32, "kv_heads": 32}


def config(adapter: str = "lora", **values: Any) -> TrainingConfig:
    return TrainingConfig(adapter=AdapterConfig(type=adapter), **{"batch_size": 1, "max_seq_length": 512,
                                                                    **values})  # type: ignore[arg-type]


def test_the_memory_model_orders_methods_and_knobs_as_they_behave() -> None:
    full, lora, qlora = (peak_memory(SEVEN_B, config(a)) for a in ("full", "lora", "qlora"))
    assert full is not None and lora is not None and qlora is not None
    # Full: fp32 weights, gradients and two AdamW moments, 16 bytes a parameter.
    assert full.total_gib > 16 * SEVEN_B["parameters"] / GIB
    # LoRA: the frozen base in bf16 (12.6 GiB) and r=16 adapters on every linear (40M parameters).
    assert 12.5 < lora.weights / GIB < 13 and lora.trainable_parameters == 16 * 32 * (
        2 * 8192 + 2 * 8192 + 3 * (4096 + 11008))
    # QLoRA: the decoder's linears in 4 bits.
    assert qlora.weights / GIB < 4.5 and qlora.weights < lora.weights / 3 and qlora.total_gib < lora.total_gib
    checkpointed = peak_memory(SEVEN_B, config(gradient_checkpointing=True, batch_size=8, max_seq_length=2048))
    plain = peak_memory(SEVEN_B, config(batch_size=8, max_seq_length=2048))
    assert checkpointed is not None and plain is not None and checkpointed.activations < plain.activations / 5
    # A pass short enough to keep all its products' outputs within SAVED_OUTPUTS_PER_PASS_MB costs what it would
    # without checkpointing, and more: the layers' inputs and one layer's recomputation on top.
    short = {"batch_size": 1, "max_seq_length": 8}
    checkpointed, plain = (peak_memory(SEVEN_B, config(gradient_checkpointing=gc, **short)) for gc in (True, False))
    assert checkpointed is not None and plain is not None and checkpointed.activations > plain.activations
    sharded = peak_memory(SEVEN_B, config("full", processes=4, distributed="fsdp"))
    assert sharded is not None and sharded.weights == pytest.approx(full.weights / 4)
    assert peak_memory({"parameters": None}, config()) is None


def test_activations_are_one_forward_pass_of_the_recipe_not_the_whole_batch() -> None:
    """The recipe runs a batch as forward passes of whole rows within forward_tokens(...) tokens (a longer row
    alone) and frees each pass's activations in its backward: a batch of 16 rows of 512 tokens keeps what 2 do."""
    assert forward_tokens(False) == 1024 and forward_tokens(True) == 512

    def activations(**values: Any) -> float:
        estimate = peak_memory(SEVEN_B, config(**values))
        assert estimate is not None
        return estimate.activations

    assert activations(batch_size=16, max_seq_length=512) == activations(batch_size=2, max_seq_length=512)
    assert activations(batch_size=2, max_seq_length=512) == 2 * activations(batch_size=1, max_seq_length=512)
    assert activations(batch_size=8, max_seq_length=4096) == activations(batch_size=1, max_seq_length=4096)
    # rows of up to 400 tokens: shorter ones fill a pass to the budget, so it is counted at 1,024 tokens
    assert activations(batch_size=3, max_seq_length=400) == activations(batch_size=1, max_seq_length=1024)
    assert activations(batch_size=2, max_seq_length=400) == 2 * activations(batch_size=1, max_seq_length=400)
    checkpointed = {"gradient_checkpointing": True, "max_seq_length": 256}
    assert activations(batch_size=8, **checkpointed) == activations(batch_size=2, **checkpointed)
    assert activations(batch_size=8, **checkpointed) < activations(batch_size=4, max_seq_length=256)
    # each of 4 processes takes 4 of the batch's 16 rows of 1,024 tokens: passes of one row, as alone with batch 1
    assert activations(batch_size=16, max_seq_length=1024, processes=4, distributed="ddp") == activations(
        batch_size=1, max_seq_length=1024)


def test_a_dpo_pair_is_estimated_as_one_row_of_its_prompt_and_both_answers() -> None:
    """A pair's row holds its prompt once and both answers (up to twice max_seq_length); the CPU's masked attention
    keeps scores over the whole row, so a pair costs more than two rows of max_seq_length would there."""
    # passes of MAX_TOKENS_PER_FORWARD (1,024) tokens: two pairs, four rows of 256 tokens, two rows
    supervised = peak_memory(SEVEN_B, config(batch_size=2, max_seq_length=256), device="cpu")
    dpo = peak_memory(SEVEN_B, config(batch_size=2, max_seq_length=256, method="dpo"), device="cpu")
    twice = peak_memory(SEVEN_B, config(batch_size=4, max_seq_length=256), device="cpu")
    assert supervised is not None and dpo is not None and twice is not None
    assert dpo.activations > twice.activations > supervised.activations
    # the output layer runs on a chunk of labelled positions at a time, a whole pass of logits only under FSDP; on a
    # CPU a frozen one a block of its rows at a time (a chunk of many positions takes the shortest blocks)
    rows = peak_memory(SEVEN_B, config(batch_size=4, max_seq_length=1024), device="cpu")
    pairs = peak_memory(SEVEN_B, config(batch_size=4, max_seq_length=1024, method="dpo"), device="cpu")
    assert rows is not None and pairs is not None
    block = LOGP_CHUNK_TOKENS * vocab_block_rows(LOGP_CHUNK_TOKENS)
    assert pairs.logits == rows.logits == block * 12
    # fewer positions take longer blocks: a chunk counts the largest any of its first positions makes (45 of them
    # sweep 16,384 rows at a time, 46 sweep 8,192)
    few = peak_memory(SEVEN_B, config(batch_size=1, max_seq_length=46), device="cpu")
    assert vocab_block_rows(45) == 2 * vocab_block_rows(46) == 16384
    assert few is not None and few.logits == 45 * 16384 * 12
    gpu = peak_memory(SEVEN_B, config(batch_size=4, max_seq_length=1024))
    full = peak_memory(SEVEN_B, config("full", batch_size=4, max_seq_length=1024), device="cpu")
    head = peak_memory(SEVEN_B, TrainingConfig(adapter=AdapterConfig(type="lora", target_modules=["q_proj", "lm_head"]),
                                               batch_size=4, max_seq_length=1024), device="cpu")
    assert gpu is not None and full is not None and head is not None
    assert gpu.logits == LOGP_CHUNK_TOKENS * SEVEN_B["vocab_size"] * 10
    assert full.logits == head.logits == LOGP_CHUNK_TOKENS * SEVEN_B["vocab_size"] * 12
    # a target names a module by its end, as PEFT matches it
    longer = peak_memory(SEVEN_B, TrainingConfig(adapter=AdapterConfig(
        type="lora", target_modules=["self_attn.q_proj", "model.lm_head"]), batch_size=4, max_seq_length=1024),
        device="cpu")
    assert longer is not None and longer.logits == head.logits and longer.trainable_parameters == \
        head.trainable_parameters > 0
    sharded = peak_memory(SEVEN_B, config(batch_size=8, max_seq_length=1024, processes=2, distributed="fsdp"))
    # each process's 4 rows run as passes of one row (1,024 tokens)
    assert sharded is not None and sharded.logits == 1024 * SEVEN_B["vocab_size"] * 10


def test_auto_precision_is_estimated_as_the_worker_resolves_it() -> None:
    """bf16 where the device computes it natively (a GPU, a CPU with bf16 instructions), fp32 on other CPUs."""
    gpu, cpu = peak_memory(SEVEN_B, config()), peak_memory(SEVEN_B, config(), device="cpu")
    amx = peak_memory(SEVEN_B, config(), device="cpu", cpu_bf16=True)
    assert gpu is not None and cpu is not None and amx is not None
    assert (gpu.precision, cpu.precision, amx.precision) == ("bf16", "fp32", "bf16")
    assert amx.weights == gpu.weights < cpu.weights


def test_an_estimate_answers_without_creating_anything(client: TestClient, session: Session) -> None:
    file_id = upload_chat(client, n=30)
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 2, "batch_size": 4}}
    answer = client.post("/v1/fine_tuning/jobs/estimate", json=body)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["object"] == "fine_tuning.job.estimate" and found["method"] == "lora"
    assert (found["examples"], found["batches_per_epoch"], found["steps"]) == (30, math.ceil(30 / 4), 2 * 8)
    assert found["memory"]["total_gib"] > 0 and found["memory"]["trainable_parameters"] > 0
    assert found["workers"] == []
    assert session.scalar(select(func.count()).select_from(FineTuningJob)) == 0
    refused = client.post("/v1/fine_tuning/jobs/estimate", json={**body, "model": "no-such-model"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "model_not_available"


def test_a_job_no_live_worker_can_hold_is_refused_with_the_numbers(client: TestClient, session: Session) -> None:
    session.add(RegisteredModel(name="seven-b", source="path:/models/seven-b", trust_remote_code=False,
                                allow_pickle=False, status="ready", info=SEVEN_B, files=[], tokenizer={}))
    worker_service.register_worker(session, spec=worker_service.WorkerSpec(
        name="small-gpu", hostname="h", pid=1, queue="training.small-gpu", version="t", gpus=1, gpu_memory_gb=23.6))
    session.commit()
    file_id = upload_chat(client)
    body: dict[str, Any] = {"model": "seven-b", "training_file": file_id,
                            "method": {"type": "supervised", "supervised": {"adapter": {"type": "full"}}}}
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body).json()
    assert estimate["workers"] == [{"name": "small-gpu", "gpus": 1, "gpu_memory_gb": 23.6, "fits": False}]
    refused = client.post("/v1/fine_tuning/jobs", json=body)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "insufficient_memory" and "23.6 GiB" in error["message"]
    assert f"{estimate['memory']['total_gib']:.1f} GiB" in error["message"]
    # QLoRA of the same model with gradient checkpointing fits that GPU.
    body["method"]["supervised"].update(adapter={"type": "qlora"},
                                        hyperparameters={"gradient_checkpointing": True})
    assert client.post("/v1/fine_tuning/jobs/estimate", json=body).json()["workers"][0]["fits"] is True
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text


def test_creation_checks_memory_as_the_estimate_reports_it(client: TestClient, session: Session) -> None:
    """Both size a job's rows by the training file's longest example (its tokens counted for the model at upload),
    not max_seq_length: a worker that the estimate says fits is not refused at creation."""
    from tests.support.data import chat_lines, jsonl

    uploaded = client.post("/v1/files?model=tiny-llama", data={"purpose": "fine-tune"},
                           files={"file": ("train.jsonl", jsonl(chat_lines(12)), "application/jsonl")}).json()
    stats = client.get(f"/v1/files/{uploaded['id']}/validation_report").json()["report"]["tokens"]["tiny-llama"]
    longest = stats["tokens_per_example"]["max"]
    model = client.get("/v1/models/tiny-llama").json()["details"]
    settings = config(batch_size=4, max_seq_length=2048)
    rows, whole_rows = peak_memory(model, settings, seq_length=longest), peak_memory(model, settings)
    assert rows is not None and whole_rows is not None and rows.total_gib < whole_rows.total_gib - 0.01
    worker_service.register_worker(session, spec=worker_service.WorkerSpec(
        name="snug-gpu", hostname="h", pid=1, queue="training.snug-gpu", version="t", gpus=1,
        gpu_memory_gb=(rows.total_gib + whole_rows.total_gib) / 2))
    session.commit()
    body: dict[str, Any] = {"model": "tiny-llama", "training_file": uploaded["id"], "method": {
        "type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4, "max_seq_length": 2048}}}}
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body).json()
    assert estimate["memory"]["total_gib"] == pytest.approx(rows.total_gib, abs=1e-3)
    assert estimate["workers"][0]["fits"] is True
    created = client.post("/v1/fine_tuning/jobs", json=body)
    assert created.status_code == 200, created.text


def test_a_packed_estimate_counts_the_rows_packing_makes(client: TestClient, session: Session) -> None:
    """With packing, the steps come from the rows the file's examples pack into at the job's max_seq_length
    (counted once, kept in the file's report), not from the fewest rows its tokens could fill."""
    from app.models import File

    file_id = upload_chat(client, n=30)
    hyper = {"n_epochs": 1, "batch_size": 2, "packing": True, "max_seq_length": 96}
    answer = client.post("/v1/fine_tuning/jobs/estimate", json={
        "model": "tiny-llama", "training_file": file_id, "method": {"supervised": {"hyperparameters": hyper}}})
    assert answer.status_code == 200, answer.text
    stats = session.scalar(select(File).where(File.id == file_id)).report["tokens"]["tiny-llama"]
    rows = stats["packed_rows"]["96"]
    assert math.ceil(stats["total_tokens"] / 96) < rows < 30  # the fewest rows the tokens fill: what it said before
    assert (answer.json()["batches_per_epoch"], answer.json()["steps"]) == (math.ceil(rows / 2), math.ceil(rows / 2))
