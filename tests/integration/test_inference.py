"""Train, then talk to what was trained: chat completions on the fine-tuned model through the real API and a real
inference worker process, with the unmodified openai SDK; projects kept apart; an inference process killed
mid-answer gives the client an error, and a new one serves the next request."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import Service, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration

COLOURS = {"red", "blue", "green"}


def wait_for_inference(service: Service, timeout: float = 120) -> None:
    """Until a completion on the base model is served (the worker registered and answers)."""
    deadline = time.monotonic() + timeout
    with service.client() as client:
        while time.monotonic() < deadline:
            answer = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "a", "max_tokens": 1})
            if answer.status_code == 200:
                return
            assert answer.status_code == 503, answer.text
            time.sleep(0.5)
    raise TimeoutError("no inference worker answered")


PROMPTS = [[{"role": "system", "content": "You map codes to colours."}, {"role": "user", "content": f"code {i}"}]
           for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained(service: Service) -> dict[str, Any]:
    """A job trained to answer codes with colours (with checkpoints), and an inference worker started meanwhile."""
    inference = service.start_inference("inference-1")
    sdk = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.api_key, max_retries=0)
    uploaded = sdk.files.create(file=("train.jsonl", jsonl(chat_lines(48))), purpose="fine-tune")
    # Codes the job trains on (the colour of a code is arbitrary: only seen codes can be learned).
    validation = sdk.files.create(file=("valid.jsonl", jsonl(chat_lines(12))), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, validation_file=validation.id,
                                      suffix="chat", seed=5, method={
        "type": "supervised", "supervised": {  # type: ignore[typeddict-unknown-key]
            "hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate": 3e-3, "n_checkpoints": 2},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "evaluation": {"max_examples": 12}}})
    with service.client() as client:
        done = wait_for_status(client, job.id, TERMINAL, timeout=300)
    assert done["status"] == "succeeded", done
    wait_for_inference(service)
    return {"job": done, "model": done["fine_tuned_model"], "sdk": sdk, "inference": inference}


def test_a_fine_tuned_model_answers_through_the_sdk_and_survives_its_inference_worker_dying(
        service: Service, trained: dict[str, Any]) -> None:
    sdk, model, inference, prompts = trained["sdk"], trained["model"], trained["inference"], PROMPTS
    tuned = [sdk.chat.completions.create(model=model, messages=p, temperature=0, max_tokens=8)  # type: ignore[arg-type]
             for p in prompts]
    base = [sdk.chat.completions.create(model="tiny-llama", messages=p, temperature=0, max_tokens=8)  # type: ignore[arg-type]
            for p in prompts]
    # The adapter answers in the trained format (one colour, then its end of turn); the base does not.
    assert all(a.choices[0].message.content in COLOURS and a.choices[0].finish_reason == "stop" for a in tuned), tuned
    assert not any(a.choices[0].message.content in COLOURS for a in base), base
    streamed = sdk.chat.completions.create(model=model, messages=prompts[0], temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        tuned[0].choices[0].message.content

    # Another project cannot generate with this project's model: 404, as for an unknown id.
    created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "other-team"], env=service.env,
                             check=True, capture_output=True, text=True)
    other = openai.OpenAI(base_url=f"{service.base_url}/v1", max_retries=0,
                          api_key=json.loads(created.stdout.strip().splitlines()[-1])["key"])
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=model, messages=prompts[0], max_tokens=4)  # type: ignore[arg-type]

    # The inference process dies mid-answer: the stream ends with an error the SDK raises, never a hang.
    long = sdk.completions.create(model="tiny-llama", prompt="the", temperature=0, max_tokens=1500, stream=True,
                                  timeout=60)
    received = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in long:
            received.append(chunk)
            if len(received) == 3:
                inference.send_signal(signal.SIGKILL)
    assert "stopped while answering" in str(failed.value.message), failed.value
    assert not any(c.choices and c.choices[0].finish_reason for c in received)
    inference.wait(timeout=10)

    # A new inference worker serves the next request; the dead one's row is skipped (connection refused).
    service.start_inference("inference-2")
    wait_for_inference(service)
    again = sdk.chat.completions.create(model=model, messages=prompts[0], temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert again.choices[0].message.content == tuned[0].choices[0].message.content


def export(service: Service, model: str, fmt: str, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "models", "export", model, "--format", fmt, "-o",
                           str(output), "--url", service.base_url, "--api-key", service.api_key],
                          capture_output=True, text=True, env=service.env, timeout=300)


def greedy(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
    import torch

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    return str(tokenizer.decode(out, skip_special_tokens=True))


def test_exports_load_in_peft_and_transformers_as_they_are(service: Service, trained: dict[str, Any],
                                                          tmp_path: Path, tiny_model_dir: Path) -> None:
    """`tuneforge models export`: the peft folder loads with AutoPeftModelForCausalLM (its base found from the
    folder's own config) and the merged one with AutoModelForCausalLM; both answer as the service does."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained["model"]
    served = [trained["sdk"].chat.completions.create(model=model, messages=p, temperature=0,  # type: ignore[arg-type]
                                                     max_tokens=8).choices[0].message.content for p in PROMPTS]
    done = export(service, model, "peft", tmp_path / "peft")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--enable-lora" in done.stdout and "--lora-modules" in done.stdout
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and not config.get("use_dora")
    manifest = json.loads((tmp_path / "peft" / "tuneforge_export.json").read_text())
    assert manifest["vllm"]["loads"] and manifest["fine_tuning_job"] == trained["job"]["id"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "peft")
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "peft").eval()
    assert [greedy(adapter, tokenizer, p) for p in PROMPTS] == served

    done = export(service, model, "merged", tmp_path / "merged")
    assert done.returncode == 0, done.stdout + done.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert [greedy(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), p) for p in PROMPTS] == served

    with service.client() as client:
        steps = [c["step_number"] for c in client.get(f"/v1/fine_tuning/jobs/{trained['job']['id']}/checkpoints")
                 .json()["data"]]
    checkpoint = f"{model}:ckpt-step-{min(steps)}"
    done = export(service, checkpoint, "peft", tmp_path / "ckpt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes() != \
        (tmp_path / "peft" / "adapter_model.safetensors").read_bytes()
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()  # the adapter, not the training state
    refused = export(service, "tiny-llama", "peft", tmp_path / "base")
    assert refused.returncode != 0 and "is a base model" in refused.stdout + refused.stderr


def test_the_job_ends_with_a_base_versus_tuned_answer_report(service: Service, trained: dict[str, Any]) -> None:
    job = trained["job"]
    headline = job["evaluation"]
    assert headline["examples"] == 12 and job["method"]["supervised"]["evaluation"]["max_examples"] == 12
    # The tuned model learned the format (a colour, then its end of turn) and some of the codes' colours (each code's
    # colour is arbitrary: 48 steps of a tiny model memorise about a third, measured 4/12); the base answers none.
    assert headline["base"]["exact_match"] == 0.0 and headline["tuned"]["exact_match"] >= 0.25, headline
    assert headline["tuned"]["f1"] > headline["base"]["f1"] and headline["tuned_minus_base"]["exact_match"] > 0
    # The base never ends its turn within the budget; the tuned model nearly always does (measured 11 of 12).
    assert headline["tuned"]["hit_max_tokens"] <= 0.25 and headline["base"]["hit_max_tokens"] == 1.0, headline
    with service.client() as client:
        names = {a["name"] for a in client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]}
        assert {"eval_report", "eval_samples"} <= names
        report = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/eval_report").json()
        samples = [json.loads(line) for line in
                   client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/eval_samples").text.splitlines()]
        events = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert report["tuned"] == headline["tuned"] and len(samples) == 12
    assert [s["reference"] for s in samples] == ["red", "blue", "green"] * 4
    assert sum(s["tuned"]["answer"] in COLOURS for s in samples) >= 9
    assert not any(s["base"]["answer"] in COLOURS for s in samples)
    assert sum(s["tuned"]["answer"] == s["reference"] for s in samples) / 12 == headline["tuned"]["exact_match"]
    # The report's tuned answers are what the fine-tuned model answers through the API.
    first = trained["sdk"].chat.completions.create(model=trained["model"], messages=samples[0]["prompt"],  # type: ignore[arg-type]
                                                   temperature=0, max_tokens=report["max_new_tokens"])
    assert first.choices[0].message.content == samples[0]["tuned"]["answer"]
    assert any(m.startswith("Answer report on 12 validation examples") for m in events)
    # The checkpoint of the final weights carries the tuned model's figures too.
    with service.client() as client:
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    final = next(c for c in checkpoints if c["step_number"] == job["progress"]["step"])
    assert final["metrics"]["answer_exact_match"] == headline["tuned"]["exact_match"]
    assert final["metrics"]["answer_rouge_l"] == headline["tuned"]["rouge_l"]
    assert not any("answer_exact_match" in c["metrics"] for c in checkpoints if c is not final)


def test_an_answer_report_can_be_asked_for_later_on_any_file(service: Service, trained: dict[str, Any]) -> None:
    job, sdk = trained["job"], trained["sdk"]
    later = sdk.files.create(file=("later.jsonl", jsonl(chat_lines(6, offset=3))), purpose="fine-tune")  # codes 3-8
    with service.client() as client:
        path = f"/v1/fine_tuning/jobs/{job['id']}/evaluations"
        refused = client.post(path, json={"file_id": "file-nope"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "file_id"
        wrong = client.post(path, json={"file_id": later.id, "model": "tiny-llama"})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
        created = client.post(path, json={"file_id": later.id, "max_examples": 6})
        assert created.status_code == 200, created.text
        assert created.json()["status"] in ("queued", "running") and created.json()["model"] == trained["model"]
        evaluation_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while (found := client.get(f"{path}/{evaluation_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
        assert found["status"] == "succeeded", found
        assert [e["id"] for e in client.get(path).json()["data"]] == [evaluation_id]
        report_file, samples_file = found["result_files"]
        report = client.get(f"/v1/files/{report_file}/content").json()
        samples = [json.loads(line) for line in client.get(f"/v1/files/{samples_file}/content").text.splitlines()]
        job_samples = [json.loads(line) for line in client.get(
            f"/v1/fine_tuning/jobs/{job['id']}/artifacts/eval_samples").text.splitlines()]
    assert report == found["report"] and report["examples"] == 6 and len(samples) == 6
    # The same weights answer the same prompts the same way in the inference worker as in the job's own report.
    assert [s["tuned"]["answer"] for s in samples] == [s["tuned"]["answer"] for s in job_samples[3:9]]
    assert [s["base"]["answer"] for s in samples] == [s["base"]["answer"] for s in job_samples[3:9]]
