"""The model registry against a fake Hub on loopback: pinning, what is read, and every refusal."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session

from app.core.config import CatalogueModel, Settings
from app.core.errors import APIError, Conflict, InvalidRequest
from app.schemas.training import TrainingConfig
from app.services import base_models
from app.services.estimates import peak_memory
from tests.factories import create_job
from tests.support.fake_hub import FakeHub, pickle_only, repo_from_dir

MAIN = "a" * 40
V1 = "b" * 40
TOKEN = "hf_secret_registry_token"
# A config.json cut short, as a copy interrupted half way leaves it.
TRUNCATED_CONFIG = '{"model_type": "llama", "hidden_size": '


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    chat = repo_from_dir("test-org/tiny-chat", tiny_model_dir, revisions={"main": MAIN, "v1": V1},
                         license="apache-2.0")
    gated = repo_from_dir("test-org/gated-chat", tiny_model_dir, gated=True)
    renamed = repo_from_dir("test-org/renamed-chat", tiny_model_dir)  # a type transformers renames as it loads
    renamed.files["config.json"] = json.dumps({**json.loads(renamed.files["config.json"]),
                                               "model_type": "mixtral"}).encode()
    truncated = repo_from_dir("test-org/truncated-chat", tiny_model_dir, revisions={"main": MAIN})
    truncated.files["config.json"] = TRUNCATED_CONFIG.encode()
    with FakeHub([chat, gated, renamed, truncated,
                  pickle_only(repo_from_dir("test-org/pickle-chat", tiny_model_dir))], token=TOKEN) as fake:
        fake.patch_env(monkeypatch)
        yield fake


def settings(**values: object) -> Settings:
    """Settings without the test session's catalogue (and with `values`)."""
    return Settings(**{"model_catalogue": {}, "catalogue_file": Path("/nonexistent/catalogue.json"), **values})


def refusal(session: Session, **kwargs: object) -> APIError:
    with pytest.raises(APIError) as caught:
        base_models.register(session, settings=kwargs.pop("settings", settings()),  # type: ignore[arg-type]
                             **kwargs)  # type: ignore[arg-type]
    return caught.value


def model_copy(tiny_model_dir: Path, folder: Path, files: dict[str, str] | None = None) -> Path:
    """A copy of the tiny model with some files' text replaced."""
    shutil.copytree(tiny_model_dir, folder)
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def tiny_gpt2(folder: Path, tiny_model_dir: Path) -> Path:
    """A GPT-2 folder as save_pretrained writes one: config.json says n_embd, n_layer, n_head and n_positions."""
    from safetensors.numpy import save_file

    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    vocab, h = 256, 16
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_embd": h, "n_layer": 2,
        "n_head": 4, "n_positions": 128, "n_inner": None, "torch_dtype": "float32", "tie_word_embeddings": True}))
    tensors = {"transformer.wte.weight": np.zeros((vocab, h), np.float32),
               "transformer.wpe.weight": np.zeros((128, h), np.float32)}
    for layer in range(2):
        tensors |= {f"transformer.h.{layer}.attn.c_attn.weight": np.zeros((h, 3 * h), np.float32),
                    f"transformer.h.{layer}.attn.c_proj.weight": np.zeros((h, h), np.float32),
                    f"transformer.h.{layer}.mlp.c_fc.weight": np.zeros((h, 4 * h), np.float32),
                    f"transformer.h.{layer}.mlp.c_proj.weight": np.zeros((4 * h, h), np.float32),
                    f"transformer.h.{layer}.ln_1.weight": np.zeros((h,), np.float32)}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_a_hub_model_is_pinned_to_its_revision_and_described(session: Session, hub: FakeHub,
                                                             tiny_model_dir: Path) -> None:
    row = base_models.register(session, settings=settings(), name="tiny-chat", source="hf:test-org/tiny-chat",
                               revision="v1")
    # Read and pinned; no worker host holds the weights yet.
    assert (row.status, row.commit_sha, row.revision) == ("registered", V1, "v1")
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert row.info["architecture"] == config["architectures"][0]
    assert (row.info["layers"], row.info["hidden_size"], row.info["vocab_size"]) == (
        config["num_hidden_layers"], config["hidden_size"], config["vocab_size"])
    assert row.info["context_length"] == config["max_position_embeddings"]
    assert row.info["license"] == "apache-2.0" and row.info["has_chat_template"] is True
    weights = (tiny_model_dir / "model.safetensors").stat().st_size
    assert row.info["bytes"] >= weights and row.info["parameters"] > 0
    names = {f["name"] for f in row.files}
    assert "model.safetensors" in names and "config.json" in names
    assert next(f for f in row.files if f["name"] == "model.safetensors")["sha256"]
    # The API host keeps the tokenizer: token statistics need no weights.
    assert json.loads(row.tokenizer["tokenizer.json"]) == json.loads((tiny_model_dir / "tokenizer.json").read_text())
    # The weights' headers give the module names target_modules may use (a bounded range read, not a download).
    assert row.info["modules"] == ["down_proj", "embed_tokens", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                   "up_proj", "v_proj"]
    assert hub.downloads("test-org/tiny-chat", "model.safetensors") == 0
    assert hub.header_reads("test-org/tiny-chat", "model.safetensors") == ["bytes=0-100000"]
    # A type whose checkpoint names transformers changes as it loads: no names kept, so no header read.
    renamed = base_models.register(session, settings=settings(), name="renamed", source="hf:test-org/renamed-chat")
    assert renamed.info["modules"] is None and renamed.info["parameters"] == row.info["parameters"]
    assert hub.header_reads("test-org/renamed-chat", "model.safetensors") == []
    # The default branch pins to its own commit.
    other = base_models.register(session, settings=settings(), name="tiny-main", source="test-org/tiny-chat")
    assert (other.source, other.commit_sha) == ("hf:test-org/tiny-chat", MAIN)


def test_unknown_repositories_and_revisions_say_what_to_do(session: Session, hub: FakeHub) -> None:
    missing = refusal(session, name="x", source="hf:test-org/nope")
    assert (missing.status_code, missing.code, missing.param) == (400, "model_not_available", "source")
    assert missing.message == ("No repository 'test-org/nope' on the Hub, or it is private: check the id, or set "
                               "TUNEFORGE_HF_TOKEN to a token that can read it.")
    revision = refusal(session, name="x", source="hf:test-org/tiny-chat", revision="v9")
    assert (revision.code, revision.param) == ("model_not_available", "revision") and "'v9'" in revision.message


def test_a_gated_model_needs_the_token_which_no_message_shows(session: Session, hub: FakeHub) -> None:
    gated = refusal(session, name="g", source="hf:test-org/gated-chat")
    assert (gated.status_code, gated.code, gated.param) == (400, "model_gated", "source")
    assert "TUNEFORGE_HF_TOKEN" in gated.message
    wrong = refusal(session, name="g", source="hf:test-org/gated-chat", settings=settings(hf_token="hf_wrong"))
    assert wrong.code == "model_gated" and "hf_wrong" not in wrong.message
    row = base_models.register(session, settings=settings(hf_token=SecretStr(TOKEN)), name="g",
                               source="hf:test-org/gated-chat")
    assert row.status == "registered" and TOKEN not in json.dumps([row.info, row.files, row.error])


def test_pickle_only_weights_are_refused_unless_allowed(session: Session, hub: FakeHub) -> None:
    refused = refusal(session, name="p", source="hf:test-org/pickle-chat")
    assert refused.code == "model_not_available" and "allow_pickle" in refused.message
    row = base_models.register(session, settings=settings(), name="p", source="hf:test-org/pickle-chat",
                               allow_pickle=True)
    assert "pytorch_model.bin" in {f["name"] for f in row.files}
    assert row.info["modules"] is None  # no header to read them from: target_modules is not checked


def test_sources_outside_the_allowlist_are_refused(session: Session, hub: FakeHub) -> None:
    only_qwen = settings(model_sources="hf:Qwen/*, path:/models/*")
    refused = refusal(session, name="t", source="hf:test-org/tiny-chat", settings=only_qwen)
    assert (refused.code, refused.param) == ("model_source_not_allowed", "source")
    allowed = settings(model_sources="hf:test-org/*")
    assert base_models.register(session, settings=allowed, name="t", source="test-org/tiny-chat").status == "registered"


def test_names_are_unique_and_a_model_in_use_stays(session: Session, hub: FakeHub) -> None:
    base_models.register(session, settings=settings(), name="tiny-chat", source="hf:test-org/tiny-chat")
    with pytest.raises(Conflict):
        base_models.register(session, settings=settings(), name="tiny-chat", source="hf:test-org/tiny-chat")
    job = create_job(session, model="tiny-chat", base_model="tiny-chat", status="running")
    for status in ("running", "paused"):  # a paused job resumes on the model
        job.status = status
        session.commit()
        with pytest.raises(Conflict) as caught:
            base_models.remove(session, settings=settings(), name="tiny-chat")
        assert caught.value.code == "model_in_use" and job.id in caught.value.message
    job.status = "succeeded"
    session.commit()
    assert base_models.remove(session, settings=settings(), name="tiny-chat").name == "tiny-chat"
    assert base_models.find(session, settings=settings(), name="tiny-chat") is None


def test_an_unregistered_hub_id_is_registered_only_when_the_operator_allows_it(session: Session,
                                                                               hub: FakeHub) -> None:
    with pytest.raises(InvalidRequest) as caught:
        base_models.ready_for_jobs(session, settings=settings(), name="test-org/tiny-chat")
    assert caught.value.code == "model_not_available"
    row = base_models.ready_for_jobs(session, settings=settings(allow_unregistered_models=True),
                                     name="test-org/tiny-chat")
    assert (row.name, row.source, row.commit_sha) == ("test-org/tiny-chat", "hf:test-org/tiny-chat", MAIN)


def test_a_hub_refusal_names_the_field_that_named_the_repository(session: Session, hub: FakeHub) -> None:
    """The operator's registration names it in `source`, a job naming a hub id directly in `model`."""
    allowing = settings(allow_unregistered_models=True)
    for name, code in (("test-org/nope", "model_not_available"), ("test-org/gated-chat", "model_gated"),
                       ("test-org/truncated-chat", "model_not_available")):
        with pytest.raises(InvalidRequest) as caught:
            base_models.ready_for_jobs(session, settings=allowing, name=name)
        assert (caught.value.status_code, caught.value.code, caught.value.param) == (400, code, "model"), name
        assert (refusal(session, name="x", source=f"hf:{name}").param) == "source"


def test_a_hub_model_whose_config_does_not_parse_is_refused_naming_the_file(session: Session, hub: FakeHub) -> None:
    refused = refusal(session, name="t", source="hf:test-org/truncated-chat")
    assert (refused.status_code, refused.code, refused.param) == (400, "model_not_available", "source")
    assert refused.message == (f"config.json in the Hub repository 'test-org/truncated-chat' at {MAIN} is not valid "
                               "JSON (Expecting value at line 1 column 40): transformers could not load the model "
                               "(save_pretrained writes the file afresh).")
    assert base_models.find(session, settings=settings(), name="t") is None


def test_a_folder_whose_files_do_not_parse_is_refused_naming_the_file(session: Session, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    cases = {"truncated": ("config.json", TRUNCATED_CONFIG, "is not valid JSON (Expecting value at line 1 column 40)"),
             "list": ("config.json", "[1, 2]", "is not a JSON object"),
             "tokenizer": ("tokenizer_config.json", '{"chat_template": ',
                           "is not valid JSON (Expecting value at line 1 column 19)")}
    for name, (file, text, problem) in cases.items():
        folder = model_copy(tiny_model_dir, tmp_path / name, {file: text})
        refused = refusal(session, name=name, source=f"path:{folder}")
        assert (refused.status_code, refused.code, refused.param) == (400, "model_not_available", "source")
        assert refused.message == (f"{file} in {folder} {problem}: transformers could not load the model "
                                   "(save_pretrained writes the file afresh).")
    latin1 = model_copy(tiny_model_dir, tmp_path / "latin1")
    (latin1 / "tokenizer.json").write_bytes(b'{"normalizer": "caf\xe9"}')
    assert refusal(session, name="latin1", source=f"path:{latin1}").message == (
        f"tokenizer.json in {latin1} is not UTF-8 text: transformers could not load the model (save_pretrained "
        "writes the file afresh).")


def test_the_catalogue_is_imported_and_a_broken_entry_fails_jobs_fast(session: Session, tiny_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    catalogue = {"tiny-local": CatalogueModel(path=str(tiny_model_dir)),
                 "broken": CatalogueModel(path=str(tmp_path / "missing"))}
    with_catalogue = settings(model_catalogue=catalogue)
    rows = {r.name: r for r in base_models.list_models(session, settings=with_catalogue)}
    assert rows["tiny-local"].status == "ready" and rows["tiny-local"].source == f"path:{tiny_model_dir}"
    assert rows["broken"].status == "error" and "config.json" in (rows["broken"].error or "")
    with pytest.raises(InvalidRequest) as caught:
        base_models.ready_for_jobs(session, settings=with_catalogue, name="broken")
    assert "cannot be used" in caught.value.message and "config.json" in caught.value.message
    # Once the folder exists, the next lookup reads it again.
    shutil.copytree(tiny_model_dir, tmp_path / "missing")
    assert base_models.ready_for_jobs(session, settings=with_catalogue, name="broken").status == "ready"


def test_a_broken_catalogue_entry_is_kept_in_error_and_other_lookups_go_on(
        session: Session, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base_models, "_skipped_entries", set())  # logged once per process: this test's own process
    truncated = model_copy(tiny_model_dir, tmp_path / "truncated", {"config.json": TRUNCATED_CONFIG})
    catalogue = {"tiny-local": CatalogueModel(path=str(tiny_model_dir)),
                 "truncated": CatalogueModel(path=str(truncated)),
                 "Tiny Llama v2": CatalogueModel(path=str(tiny_model_dir))}
    with_catalogue = settings(model_catalogue=catalogue)
    with caplog.at_level(logging.WARNING, logger="tuneforge.models"):
        rows = {r.name: r for r in base_models.list_models(session, settings=with_catalogue)}
    assert (rows["tiny-local"].status, rows["truncated"].status) == ("ready", "error")
    assert rows["truncated"].error == (f"config.json in {truncated} is not valid JSON (Expecting value at line 1 "
                                       "column 40): transformers could not load the model (save_pretrained writes "
                                       "the file afresh).")
    # A name no job nor admin route could give is not imported: the log says why.
    assert "Tiny Llama v2" not in rows
    assert caplog.messages == ["Model catalogue entries skipped: Invalid model name 'Tiny Llama v2': letters, digits "
                               "and ._/@- (not starting with ft: nor ending with /pull). Rename it in the catalogue."]
    assert base_models.ready_for_jobs(session, settings=with_catalogue, name="tiny-local").status == "ready"
    with pytest.raises(InvalidRequest) as caught:
        base_models.ready_for_jobs(session, settings=with_catalogue, name="truncated")
    assert caught.value.message == f"Model 'truncated' cannot be used: {rows['truncated'].error}"
    assert base_models.remove(session, settings=with_catalogue, name="truncated").name == "truncated"


def test_a_catalogue_file_that_does_not_parse_leaves_the_registered_models_usable(
        session: Session, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a malformed catalogue file made every model lookup answer 500."""
    monkeypatch.setattr(base_models, "_skipped_entries", set())
    path = tmp_path / "catalogue.json"
    path.write_text(json.dumps({"tiny-local": {"path": str(tiny_model_dir)}}))
    good = Settings(model_catalogue={}, catalogue_file=path)
    assert base_models.ready_for_jobs(session, settings=good, name="tiny-local").status == "ready"
    for broken, problem in (('{"tiny-local": {"path": ', "Expecting value"), ("[1, 2]", "not a JSON object"),
                            ('{"tiny-local": {"folder": "/x"}}', "path")):
        path.write_text(broken)  # the operator's edit in progress
        with caplog.at_level(logging.WARNING, logger="tuneforge.models"):
            assert base_models.ready_for_jobs(session, settings=good, name="tiny-local").status == "ready"
            assert [m.name for m in base_models.list_models(session, settings=good)] == ["tiny-local"]
        assert caplog.messages[-1].startswith(f"Model catalogue entries skipped: The model catalogue {path} cannot "
                                              "be read: ") and problem in caplog.messages[-1], caplog.messages


def test_a_gpt2_config_is_read_through_its_own_key_names(session: Session, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    """GPT-2 writes n_embd, n_layer, n_head and n_positions (transformers maps them): the shape is known, so is the
    memory its jobs need."""
    folder = tiny_gpt2(tmp_path / "gpt2", tiny_model_dir)
    row = base_models.register(session, settings=settings(), name="tiny-gpt2", source=f"path:{folder}")
    info = row.info
    assert (info["hidden_size"], info["layers"], info["attention_heads"], info["kv_heads"]) == (16, 2, 4, 4)
    assert (info["context_length"], info["vocab_size"], info["architecture"]) == (128, 256, "GPT2LMHeadModel")
    assert info["modules"] == ["c_attn", "c_fc", "c_proj", "lm_head", "wpe", "wte"]
    assert peak_memory(info, TrainingConfig()) is not None


def test_a_hub_out_of_reach_is_a_502_not_a_crash(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub 2.x raises httpx's transport errors (not OSError) when the Hub cannot be reached."""
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nobody listens: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    refused = refusal(session, name="t", source="hf:test-org/tiny-chat")
    assert (refused.status_code, refused.code) == (502, "hub_unavailable"), refused.message


def test_module_names_are_kept_for_trusted_types_only_with_a_tied_output_layer(tmp_path: Path) -> None:
    """The names target_modules is checked against: a tied output layer (no tensor of its own) still counts, a type
    transformers renames as it loads keeps none, and an unfetched LFS pointer is no header."""
    tensors = [("model.embed_tokens.weight", [64, 8]), ("model.layers.0.self_attn.q_proj.weight", [8, 8]),
               ("model.layers.0.input_layernorm.weight", [8]), ("model.layers.0.self_attn.q_proj.bias", [8])]
    tied = base_models.describe({"model_type": "qwen2", "tie_word_embeddings": True}, tokenizer={}, files=[],
                                tensors=tensors, parameters=None, license_=None)
    assert tied["modules"] == ["embed_tokens", "lm_head", "q_proj"] and tied["parameters"] == 64 * 8 + 64 + 8 + 8
    renamed = base_models.describe({"model_type": "mixtral"}, tokenizer={}, files=[], tensors=tensors,
                                   parameters=None, license_=None)
    assert renamed["modules"] is None and renamed["parameters"] == tied["parameters"]
    (tmp_path / "model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    assert base_models.folder_tensors(tmp_path) is None


def test_a_registration_racing_another_of_the_same_name_answers_409_not_500(
        session: Session, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: the name was checked, then the folder or Hub read (seconds), then the row inserted; a
    registration of the same name committed meanwhile made the insert's unique-name error a 500."""
    from app.models import RegisteredModel

    real_read = base_models._read_folder

    def read_while_another_registers(row: RegisteredModel, **kwargs: object) -> None:
        real_read(row, **kwargs)  # type: ignore[arg-type]
        with session.begin_nested():
            session.add(RegisteredModel(name=row.name, source=row.source, status="ready", info={}, files=[],
                                        tokenizer={}, owned_by="someone", trust_remote_code=False, allow_pickle=False))

    monkeypatch.setattr(base_models, "_read_folder", read_while_another_registers)
    refused = refusal(session, name="racing", source=f"path:{tiny_model_dir}")
    assert isinstance(refused, Conflict) and refused.code == "model_exists" and refused.param == "name"
    assert base_models.find(session, settings=settings(), name="racing").owned_by == "someone"  # type: ignore[union-attr]


def test_a_job_naming_a_hub_model_another_job_registers_meanwhile_uses_that_registration(
        session: Session, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.models import RegisteredModel

    real_read = base_models._read_hub

    def read_while_another_registers(row: RegisteredModel, *args: object, **kwargs: object) -> None:
        real_read(row, *args, **kwargs)  # type: ignore[arg-type]
        with session.begin_nested():
            session.add(RegisteredModel(name=row.name, source=row.source, status="registered", info=row.info,
                                        files=row.files, tokenizer=row.tokenizer, commit_sha=row.commit_sha,
                                        owned_by="first", trust_remote_code=False, allow_pickle=False))

    monkeypatch.setattr(base_models, "_read_hub", read_while_another_registers)
    row = base_models.ready_for_jobs(session, settings=settings(allow_unregistered_models=True),
                                     name="test-org/tiny-chat")
    assert row.owned_by == "first" and row.commit_sha == MAIN
