"""Generation for the inference role: base models kept loaded, fine-tuned adapters attached on demand.

Several fine-tuned models of one base share one copy of its weights: the first adapter wraps the base in a
PeftModel, the next ones are loaded beside it (`load_adapter`) and the request's one is made active
(`set_adapter`); a base-model request runs with the adapters disabled. Bases and, per base, adapters are kept
in least-recently-used order within TUNEFORGE_INFERENCE_MAX_BASES / _MAX_ADAPTERS. A full fine-tune's weights
are a model of their own (an entry among the bases). Plain Python: the server (worker/inference/server.py)
calls it one request at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.core.config import Settings
from app.core.db import session_scope
from app.core.storage import Storage
from app.schemas.training import AnswerBudget
from app.services import base_models
from worker.archive import extract_tar
from worker.model_cache import ModelRef, ModelUnavailable, local_model
from worker.training.checkpoint import load_weights
from worker.training.data import prompt_ids
from worker.training.generation import answer_tokens, end_ids, inference_dtype
from worker.training.model import pick_device

logger = logging.getLogger("tuneforge.inference")


class Refusal(Exception):
    """A request this process will not run, with the HTTP status and error code the client gets."""

    def __init__(self, message: str, *, status: int = 400, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param


@dataclass
class LoadedModel:
    """A model in memory: a base (PeftModel once an adapter is attached) or a full fine-tune."""

    name: str
    model: Any
    tokenizer: Any
    context_length: int | None
    # Adapter names attached to this base, least recently used first.
    adapters: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # The base's registration whose files were loaded (app/services/base_models.py: revision_of); None when not known.
    revision: str | None = None


@dataclass
class Prepared:
    """A request ready to generate: the model to call, the prompt's ids and the sampling parameters."""

    loaded: LoadedModel
    adapter: str | None
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int


def rendered(tokenizer: Any, prompt: dict[str, Any], *, param: str, where: str = "") -> list[int]:
    """The prompt's ids; one this model cannot render is the caller's to change (a Refusal naming `param`), not a
    server fault the SDK would retry: no chat template, or one that refuses the conversation (prompt_ids says so)."""
    try:
        return prompt_ids(tokenizer, prompt)
    except ValueError as exc:
        raise Refusal(f"{where}{exc}", param=param) from exc


def base_only(loaded: LoadedModel) -> AbstractContextManager[Any]:
    """The base's own weights: a base with adapters attached runs with them switched off."""
    return loaded.model.disable_adapter() if loaded.adapters else nullcontext()


def adapter_name(weights_key: str) -> str:
    """PEFT keys modules by adapter name: no dots or colons, so a digest of the storage key."""
    return "ft_" + hashlib.sha256(weights_key.encode()).hexdigest()[:16]


class Engine:
    def __init__(self, settings: Settings, *, storage: Storage, device: torch.device | None = None,
                 base_folder: Callable[[str], tuple[Path, bool, str | None]] | None = None) -> None:
        self.settings = settings
        self.storage = storage
        # Where a base model's files are on this host, whether it may run its own code, and which registration they
        # are (revision_of): the registry's row, fetched into the model cache when needed (a test gives its own).
        self.base_folder = base_folder or self._registered_folder
        self.device = device or pick_device()
        self.dtype = inference_dtype(self.device)
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self.lock = threading.Lock()  # the models dict is read by the heartbeat thread
        self.weights_root = settings.data_dir.resolve() / "inference" / "weights"

    def for_clients(self, message: str) -> str:
        """A failure message without this host's folders (clients get it; the log keeps the paths)."""
        for folder, role in ((self.weights_root, "<weights>"), (self.settings.model_cache_root, "<model cache>"),
                             (self.settings.data_dir.resolve(), "<data dir>")):
            message = message.replace(str(folder), role)
        return message

    def loaded_bases(self) -> list[str]:
        with self.lock:
            return [name for name in self.models if not name.startswith("ft:")]

    # --- loading -------------------------------------------------------------------------------------------

    def _registered_folder(self, name: str) -> tuple[Path, bool, str | None]:
        with session_scope() as session:
            row = base_models.find(session, settings=self.settings, name=name)
            if row is None:
                raise Refusal(f"The base model {name!r} is no longer registered.", status=404, code="not_found",
                              param="model")
            ref, revision = ModelRef.of(row), base_models.revision_of(row)
        try:
            return local_model(ref, settings=self.settings, progress=logger.info), ref.trust_remote_code, revision
        except ModelUnavailable as exc:
            raise Refusal(str(exc), code="model_not_available", param="model") from exc

    def _weights(self, key: str) -> Path:
        """A fine-tuned model's archive from storage, extracted once per host (atomically: a crash mid-way
        leaves a temporary folder, never a half-filled one under the final name)."""
        target = self.weights_root / hashlib.sha256(key.encode()).hexdigest()[:32]
        if not target.is_dir():
            self.weights_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=self.weights_root))
            try:
                extract_tar(self.storage.read(key), tmp)
                try:
                    os.rename(tmp, target)
                except OSError:
                    if not target.is_dir():  # else another process on this host extracted it first: use theirs
                        raise
            except FileNotFoundError as exc:
                raise Refusal("The fine-tuned model's weights are gone (deleted or pruned).", status=404,
                              code="not_found", param="model") from exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _load(self, name: str, *, base: str, full_weights: Path | None = None) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, trust_remote_code, revision = self.base_folder(base)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, use_safetensors=True,
                                                     local_files_only=True, trust_remote_code=trust_remote_code)
        if full_weights is not None:
            load_weights(model, full_weights, full=True)
        model.to(self.device)  # type: ignore[arg-type]  # transformers' stub for .to is too narrow
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
        context = getattr(model.config, "max_position_embeddings", None)
        logger.info("loaded %s on %s", name, self.device)
        return LoadedModel(name=name, model=model, tokenizer=tokenizer, context_length=context, revision=revision)

    def _model(self, name: str, *, base: str, revision: str | None, full_weights: Path | None = None) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is not None and revision is not None and loaded.revision != revision:
            with self.lock:  # the base's name was registered again, for other weights: those are loaded instead
                self.models.pop(name, None)
            logger.info("unloaded %s: %s is registered for %s now", name, base, revision)
            loaded = None
        if loaded is None:
            with self.lock:  # room first, so memory never holds one model more than the bound
                while len(self.models) >= self.settings.inference_max_bases:
                    evicted, _ = self.models.popitem(last=False)
                    logger.info("unloaded %s (least recently used)", evicted)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            loaded = self._load(name, base=base, full_weights=full_weights)
            loaded.revision = loaded.revision or revision
            with self.lock:
                self.models[name] = loaded
        if revision is not None and loaded.revision != revision:
            # The name was registered again between the API's check and this load: the files here are the new
            # registration's, which the request was not checked against (an adapter fits only its own base).
            raise Refusal(f"The base model {base!r} was registered again, for other weights, while this request was "
                          "on its way; send it again.", code="model_not_available", param="model")
        with self.lock:
            self.models.move_to_end(name)
        return loaded

    def _attach(self, loaded: LoadedModel, key: str) -> str:
        from peft import PeftModel

        name = adapter_name(key)
        if name not in loaded.adapters:
            folder = self._weights(key)
            if not (folder / "adapter_config.json").is_file():
                raise Refusal("The fine-tuned model's archive holds no PEFT adapter.", status=500,
                              code="inference_failed")
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(str(folder), adapter_name=name)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, str(folder), adapter_name=name)
            loaded.model.eval()
            loaded.adapters[name] = None
            while len(loaded.adapters) > self.settings.inference_max_adapters:
                evicted, _ = loaded.adapters.popitem(last=False)
                loaded.model.delete_adapter(evicted)
        loaded.adapters.move_to_end(name)
        loaded.model.set_adapter(name)
        return name

    def prepare(self, request: dict[str, Any]) -> Prepared:
        """Load what the request names (a base, an adapter onto it, or a full fine-tune) and check the prompt."""
        key, base, revision = request.get("weights_key"), request["base"], request.get("base_revision")
        if key is not None and request.get("full"):
            loaded = self._model(f"ft:{adapter_name(key)}", base=base, revision=revision,
                                 full_weights=self._weights(key))
            adapter = None
        else:
            loaded = self._model(base, base=base, revision=revision)
            adapter = self._attach(loaded, key) if key is not None else None
        ids = rendered(loaded.tokenizer, request["prompt"],
                       param="messages" if "messages" in request["prompt"] else "prompt")
        max_tokens = int(request["max_tokens"])
        if loaded.context_length is not None:
            room = loaded.context_length - len(ids)
            if room < 1:
                raise Refusal(f"The prompt is {len(ids)} tokens; {request['model']!r} reads at most "
                              f"{loaded.context_length}. Shorten it.", code="context_length_exceeded",
                              param="messages" if "messages" in request["prompt"] else "prompt")
            max_tokens = min(max_tokens, room)
        seed = request.get("seed")
        return Prepared(loaded=loaded, adapter=adapter, prompt=ids, max_tokens=max_tokens,
                        temperature=float(request["temperature"]), top_p=float(request["top_p"]),
                        n=int(request["n"]), stop=list(request.get("stop") or []),
                        seed=int(seed) if seed is not None else secrets.randbits(63))

    def evaluate(self, target: dict[str, Any], *, budget: AnswerBudget) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """An answer report on a stored file: the fine-tuned weights `target` names against their base."""
        from worker.training.answer_report import answer_budget, compare_answers, examples_of, greedy_answers

        key, base, revision = target["weights_key"], target["base"], target.get("base_revision")
        with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
            path = Path(tmp) / "examples.jsonl"
            with path.open("wb") as out:
                for chunk in self.storage.read(target["file_key"]):
                    out.write(chunk)
            examples = examples_of(path, limit=budget.max_examples)
        if not examples:
            raise Refusal("The file has no example with an answer to compare with (a chat whose last message is "
                          "the assistant's, a prompt-completion example, or a preference pair).", param="file_id")
        if target.get("full"):  # a model of its own, beside its base
            tuned_model = self._model(f"ft:{adapter_name(key)}", base=base, revision=revision,
                                      full_weights=self._weights(key)).model
            base_model = self._model(base, base=base, revision=revision)
        else:  # the adapter, active on its base
            base_model = self._model(base, base=base, revision=revision)
            self._attach(base_model, key)
            tuned_model = base_model.model
        tokenizer = base_model.tokenizer
        prompts = [rendered(tokenizer, p, param="file_id", where="In the file, ") for p, _ in examples]
        tokens = answer_budget(tokenizer, examples, budget)
        tuned = greedy_answers(tuned_model, tokenizer, prompts, tokens)
        with base_only(base_model):  # the base's own answers, whatever adapters it carries
            answers_of_base = greedy_answers(base_model.model, tokenizer, prompts, tokens)
        return compare_answers(examples, prompts, tokens, base=answers_of_base, tuned=tuned)

    # --- generation ----------------------------------------------------------------------------------------

    def generate(self, prepared: Prepared, *, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """The answer's lines: begin, delta..., end per choice (choices one after the other)."""
        loaded = prepared.loaded
        generator = torch.Generator(device=self.device).manual_seed(prepared.seed)
        with base_only(loaded) if prepared.adapter is None else nullcontext(), torch.inference_mode():
            for index in range(prepared.n):
                yield {"type": "begin", "index": index}
                yield from self._choice(prepared, index=index, generator=generator, cancelled=cancelled)

    def _choice(self, prepared: Prepared, *, index: int, generator: torch.Generator,
                cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        loaded = prepared.loaded
        ends = end_ids(loaded.model, loaded.tokenizer)
        for line in answer_tokens(loaded.model, loaded.tokenizer, prepared.prompt, max_tokens=prepared.max_tokens,
                                  temperature=prepared.temperature, top_p=prepared.top_p, stop=prepared.stop,
                                  generator=generator, cancelled=cancelled, ends=ends):
            yield {**line, "index": index}
