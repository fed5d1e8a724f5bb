"""The inference engine on the tiny model: greedy answers as transformers' own generate gives them, adapters that
share one base and change its answers, LRU bounds, stop sequences, limits, seeds and full fine-tunes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.config import Settings
from app.core.storage import LocalStorage
from tests.support.adapters import perturbed_model, store_adapter, store_full_weights
from worker.inference.engine import Engine, Refusal, adapter_name
from worker.training.data import prompt_ids

CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


def request(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "base": "tiny-llama", "weights_key": None, "full": False, "prompt": CHAT,
            "max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": [], "seed": 1, **overrides}


def answer(engine: Engine, req: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    lines = list(engine.generate(engine.prepare(req), cancelled=threading.Event()))
    texts = [""] * req["n"]
    for line in lines:
        if line["type"] == "delta":
            texts[line["index"]] += line["text"]
    return texts, [line for line in lines if line["type"] == "end"]


@pytest.fixture
def setup(tmp_path: Path, tiny_model_dir: Path) -> tuple[Engine, LocalStorage]:
    storage = LocalStorage(tmp_path / "storage")
    settings = Settings(data_dir=tmp_path / "data", inference_max_adapters=2)
    engine = Engine(settings, storage=storage, device=torch.device("cpu"),
                    base_folder=lambda name: (tiny_model_dir, False, None))
    return engine, storage


def reference_greedy(model: Any, tokenizer: Any, max_new_tokens: int) -> str:
    """transformers' own greedy generate on the same prompt, decoded as the engine decodes."""
    ids = torch.tensor([prompt_ids(tokenizer, CHAT)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    return tokenizer.decode([t for t in out if t != tokenizer.eos_token_id], skip_special_tokens=True)


def test_greedy_answers_match_transformers_generate(setup: tuple[Engine, LocalStorage], tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine, storage = setup
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    key = store_adapter(tiny_model_dir, storage, tmp_path, seed=1)
    (base_text,), _ = answer(engine, request())
    (tuned_text,), (end,) = answer(engine, request(weights_key=key, model="ft:a"))
    assert base_text == reference_greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, 12)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      tmp_path / "adapter-1").eval()
    assert tuned_text == reference_greedy(tuned, tokenizer, 12)
    assert tuned_text != base_text and end["completion_tokens"] == 12 and end["finish_reason"] == "length"


def test_adapters_share_one_base_and_the_base_answers_without_them(setup: tuple[Engine, LocalStorage],
                                                                   tmp_path: Path, tiny_model_dir: Path) -> None:
    engine, storage = setup
    first, second = (store_adapter(tiny_model_dir, storage, tmp_path, seed=s) for s in (1, 2))
    (base_before,), _ = answer(engine, request())
    (a,), _ = answer(engine, request(weights_key=first))
    (b,), _ = answer(engine, request(weights_key=second))
    (base_after,), _ = answer(engine, request())
    assert len({a, b, base_before}) == 3 and base_after == base_before
    assert list(engine.models) == ["tiny-llama"]  # one copy of the base weights for both adapters
    loaded = engine.models["tiny-llama"]
    assert list(loaded.adapters) == [adapter_name(first), adapter_name(second)]
    assert set(loaded.model.peft_config) == {adapter_name(first), adapter_name(second)}
    (a_again,), _ = answer(engine, request(weights_key=first))
    assert a_again == a


def test_adapters_beyond_the_bound_are_evicted_least_recently_used_first(setup: tuple[Engine, LocalStorage],
                                                                         tmp_path: Path, tiny_model_dir: Path) -> None:
    engine, storage = setup  # inference_max_adapters=2
    keys = [store_adapter(tiny_model_dir, storage, tmp_path, seed=s) for s in (1, 2, 3)]
    first = answer(engine, request(weights_key=keys[0]))[0]
    answer(engine, request(weights_key=keys[1]))
    answer(engine, request(weights_key=keys[0]))  # 0 is now the most recently used
    answer(engine, request(weights_key=keys[2]))
    loaded = engine.models["tiny-llama"]
    assert list(loaded.adapters) == [adapter_name(keys[0]), adapter_name(keys[2])]
    assert set(loaded.model.peft_config) == set(loaded.adapters)
    assert answer(engine, request(weights_key=keys[0]))[0] == first


def test_bases_beyond_the_bound_are_unloaded(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", inference_max_bases=1)
    engine = Engine(settings, storage=LocalStorage(tmp_path / "s"), device=torch.device("cpu"),
                    base_folder=lambda name: (tiny_model_dir, False, None))
    answer(engine, request(base="one", model="one"))
    answer(engine, request(base="two", model="two"))
    assert engine.loaded_bases() == ["two"]


def test_stop_sequences_cut_the_answer_before_them(setup: tuple[Engine, LocalStorage]) -> None:
    engine, _ = setup
    (full,), _ = answer(engine, request(max_tokens=20))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    (cut,), (end,) = answer(engine, request(max_tokens=20, stop=[stop, "never-generated"]))
    assert cut == full[:full.find(stop)] and end["finish_reason"] == "stop" and end["completion_tokens"] < 20


def test_seeds_make_sampling_reproducible(setup: tuple[Engine, LocalStorage]) -> None:
    engine, _ = setup
    sampled = request(temperature=1.0, top_p=0.9, n=3, seed=7, max_tokens=16)
    texts, ends = answer(engine, sampled)
    assert answer(engine, sampled)[0] == texts
    assert answer(engine, {**sampled, "seed": 8})[0] != texts
    assert len(set(texts)) > 1 and [e["index"] for e in ends] == [0, 1, 2]


def test_text_prompts_and_context_limits(setup: tuple[Engine, LocalStorage], tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    engine, _ = setup
    (text,), (end,) = answer(engine, request(prompt={"text": "the colour of"}, max_tokens=4))
    assert end["completion_tokens"] == 4 and text
    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    with pytest.raises(Refusal) as refused:
        engine.prepare(request(prompt={"text": "word " * (context + 10)}))
    assert refused.value.code == "context_length_exceeded" and str(context) in refused.value.message
    # A prompt that leaves little room: the answer stops at the context's end, as "length".
    prompt_tokens = len(engine.prepare(request(prompt={"text": "word " * (context // 2)})).prompt)
    room = context - prompt_tokens
    _, (end,) = answer(engine, request(prompt={"text": "word " * (context // 2)}, max_tokens=context))
    assert end["completion_tokens"] <= room and end["finish_reason"] in ("stop", "length")


def test_a_cancelled_answer_stops_at_the_next_token(setup: tuple[Engine, LocalStorage]) -> None:
    engine, _ = setup
    cancelled = threading.Event()
    lines = engine.generate(engine.prepare(request(max_tokens=50)), cancelled=cancelled)
    assert next(lines)["type"] == "begin"
    next(lines)
    cancelled.set()
    assert [line for line in lines if line["type"] == "end"] == []


def test_full_fine_tunes_are_models_of_their_own(setup: tuple[Engine, LocalStorage], tmp_path: Path,
                                                 tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    engine, storage = setup
    model = perturbed_model(tiny_model_dir, seed=3)
    key = store_full_weights(model, storage, tmp_path, key="artifacts/full/model")
    (tuned,), _ = answer(engine, request(weights_key=key, full=True, model="ft:full"))
    (base,), _ = answer(engine, request())
    assert tuned == reference_greedy(model, AutoTokenizer.from_pretrained(tiny_model_dir), 12) != base
    assert engine.loaded_bases() == ["tiny-llama"] and len(engine.models) == 2


def test_an_evaluation_on_a_stored_file_compares_the_adapter_with_its_base(
        setup: tuple[Engine, LocalStorage], tmp_path: Path, tiny_model_dir: Path) -> None:
    from app.schemas.training import AnswerBudget
    from tests.support.data import chat_lines, jsonl

    engine, storage = setup
    first, second = (store_adapter(tiny_model_dir, storage, tmp_path, seed=s) for s in (1, 2))
    answer(engine, request(weights_key=second))  # another adapter attached and active on the same base
    storage.write("files/valid", [jsonl(chat_lines(3))])
    budget = AnswerBudget(max_examples=3, max_new_tokens=5)
    report, samples = engine.evaluate({"base": "tiny-llama", "weights_key": first, "full": False,
                                       "file_key": "files/valid"}, budget=budget)
    assert report["examples"] == 3 and report["max_new_tokens"] == 5
    for sample in samples:
        prompt = {"messages": sample["prompt"]}
        (tuned,), _ = answer(engine, request(weights_key=first, prompt=prompt, max_tokens=5))
        (base,), _ = answer(engine, request(prompt=prompt, max_tokens=5))
        assert sample["tuned"]["answer"] == tuned and sample["base"]["answer"] == base
    with pytest.raises(Refusal):  # a file without answers to compare with
        storage.write("files/empty", [b'{"messages": [{"role": "user", "content": "hi"}]}\n'])
        engine.evaluate({"base": "tiny-llama", "weights_key": first, "full": False, "file_key": "files/empty"},
                        budget=budget)


def test_a_full_fine_tunes_evaluation_answers_base_with_the_bases_adapters_off(
        setup: tuple[Engine, LocalStorage], tmp_path: Path, tiny_model_dir: Path) -> None:
    from app.schemas.training import AnswerBudget
    from tests.support.data import chat_lines, jsonl

    engine, storage = setup
    adapter = store_adapter(tiny_model_dir, storage, tmp_path, seed=1)
    (plain,), _ = answer(engine, request(max_tokens=5))
    answer(engine, request(weights_key=adapter))  # the base now carries an active adapter
    store_full_weights(perturbed_model(tiny_model_dir, seed=3), storage, tmp_path, key="artifacts/full/model")
    storage.write("files/one", [jsonl([{"messages": [*CHAT["messages"], {"role": "assistant", "content": "red"}]},
                                       *chat_lines(1)])])
    _, samples = engine.evaluate({"base": "tiny-llama", "weights_key": "artifacts/full/model", "full": True,
                                  "file_key": "files/one"}, budget=AnswerBudget(max_examples=1, max_new_tokens=5))
    assert samples[0]["base"]["answer"] == plain and samples[0]["tuned"]["answer"] != plain


def test_a_base_registered_again_for_other_weights_is_loaded_again(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Found by an audit: a warm worker kept answering with the weights the name was first registered for."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    perturbed_model(tiny_model_dir, seed=3).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    for name in ("chat_template.jinja",):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, other / name)
    registered = {"tiny-llama": (tiny_model_dir, "path:/models/a@")}
    engine = Engine(Settings(data_dir=tmp_path / "data"), storage=LocalStorage(tmp_path / "storage"),
                    device=torch.device("cpu"), base_folder=lambda name: (registered[name][0], False,
                                                                          registered[name][1]))
    (first,), _ = answer(engine, request(base_revision="path:/models/a@"))
    loaded = engine.models["tiny-llama"]
    (again,), _ = answer(engine, request(base_revision="path:/models/a@"))
    assert engine.models["tiny-llama"] is loaded and again == first  # the same registration: kept warm
    registered["tiny-llama"] = (other, "path:/models/b@")  # the operator registers the name again, for other weights
    (after,), _ = answer(engine, request(base_revision="path:/models/b@"))
    assert engine.models["tiny-llama"] is not loaded and engine.models["tiny-llama"].revision == "path:/models/b@"
    # A request the API checked against the earlier registration, reaching an engine that loads the name only now
    # (the review's race): the files it finds are the new registration's, so it refuses rather than run on them.
    late = Engine(Settings(data_dir=tmp_path / "data3"), storage=LocalStorage(tmp_path / "s3"),
                  device=torch.device("cpu"), base_folder=engine.base_folder)
    with pytest.raises(Refusal) as refused:
        late.prepare(request(base_revision="path:/models/a@"))
    assert refused.value.code == "model_not_available" and refused.value.param == "model"
    assert late.models["tiny-llama"].revision == "path:/models/b@"  # what it loaded stays, tagged as what it is
    fresh = Engine(Settings(data_dir=tmp_path / "data2"), storage=LocalStorage(tmp_path / "s2"),
                   device=torch.device("cpu"), base_folder=lambda name: (other, False, None))
    (reference,), _ = answer(fresh, request())
    assert after == reference != first


# Gemma's, Mistral's and Llama 2's templates raise on a system turn, through transformers' raise_exception.
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}")


@pytest.fixture
def no_system_engine(tmp_path: Path, tiny_model_dir: Path) -> tuple[Engine, LocalStorage]:
    """The tiny model with a chat template that refuses system messages."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "no-system"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = NO_SYSTEM + tokenizer.chat_template
    tokenizer.save_pretrained(folder)
    storage = LocalStorage(tmp_path / "storage")
    return Engine(Settings(data_dir=tmp_path / "data"), storage=storage, device=torch.device("cpu"),
                  base_folder=lambda name: (folder, False, None)), storage


def test_a_conversation_the_chat_template_refuses_is_the_callers_error(
        no_system_engine: tuple[Engine, LocalStorage]) -> None:
    """Found by an audit: jinja2's TemplateError became a 502 inference_failed, which the SDK retried (prompt_ids
    now says the template refuses the conversation, in a ValueError)."""
    engine, _ = no_system_engine
    system = {"messages": [{"role": "system", "content": "be brief"}, *CHAT["messages"]]}
    with pytest.raises(Refusal) as refused:
        engine.prepare(request(prompt=system))
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "invalid_value", "messages")
    assert refused.value.message == "the model's chat template refuses this conversation: System role not supported"
    (text,), _ = answer(engine, request())  # without the system turn it answers
    assert text


def test_an_evaluation_whose_conversations_the_chat_template_refuses_says_so(
        no_system_engine: tuple[Engine, LocalStorage], tmp_path: Path, tiny_model_dir: Path) -> None:
    from app.schemas.training import AnswerBudget
    from tests.support.data import jsonl

    engine, storage = no_system_engine
    adapter = store_adapter(tiny_model_dir, storage, tmp_path, seed=1)
    storage.write("files/system", [jsonl([{"messages": [{"role": "system", "content": "be brief"},
                                                        *CHAT["messages"], {"role": "assistant", "content": "hi"}]}])])
    with pytest.raises(Refusal) as refused:
        engine.evaluate({"base": "tiny-llama", "weights_key": adapter, "full": False, "file_key": "files/system"},
                        budget=AnswerBudget(max_examples=1, max_new_tokens=2))
    assert refused.value.param == "file_id"
    assert refused.value.message == ("In the file, the model's chat template refuses this conversation: System role "
                                     "not supported")


def test_a_temperature_too_small_to_divide_by_answers_greedily(setup: tuple[Engine, LocalStorage]) -> None:
    """Found by an audit: temperature 1e-40 overflowed the logits to inf, and sampling failed on inf/nan."""
    engine, _ = setup
    (greedy,), _ = answer(engine, request(temperature=0.0))
    for tiny in (1e-40, 1e-6):
        (text,), _ = answer(engine, request(temperature=tiny, seed=5))
        assert text == greedy
