"""Backend for a local Hugging Face transformers causal LM: chat templates, batched generation on the GPU."""
from __future__ import annotations

import hashlib
import warnings

import torch

from ..clip.device import auto_device
from .backend import BackendError, ChatBackend, ChatRequest

_FALLBACK_WARNED = False
GENERATE_TOP_K = 50  # the top_k transformers' generate applies when neither the model nor the caller sets one


def _dtype_kwarg(dtype) -> dict:
    # transformers renamed from_pretrained's torch_dtype to dtype in 4.56
    import transformers  # optional heavy backend: loaded only when this backend is used

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _placement(device: torch.device) -> dict:
    """Load the weights straight onto ``device`` (an 8B model in bf16 would first take 16 GB of host RAM
    on the CPU). transformers needs accelerate for ``device_map``; without it, load and move, and say so."""
    from transformers.utils import is_accelerate_available  # optional heavy backend

    if is_accelerate_available():
        return {"device_map": str(device)}
    warnings.warn("accelerate is not installed: the language model loads into host memory first, then moves to "
                  f"{device} (pip install accelerate to load it straight onto the device)")
    return {}


class TransformersBackend(ChatBackend):
    """Generate with ``model.generate`` in left-padded batches.

    ``model``/``tokenizer``: a Hugging Face id or local path, or loaded objects (tests pass a tiny
    random model and a tokenizer built in memory). Prompts are rendered with the tokenizer's chat
    template (a plain "role: content" layout, with a warning, for base models without one).
    ``temperature=0`` decodes greedily. ``top_k``: None takes what ``generate`` would apply anyway (the
    model's generation config, else 50); it is passed explicitly and recorded with the other sampling
    parameters (0: no top-k cut). ``deterministic=True`` seeds sampling per batch from the batch's request
    seeds, so the same requests with the same ``batch_size`` give the same texts. A model given by name
    loads straight onto ``device`` in ``dtype``.
    """

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer=None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 160,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int | None = None,
        deterministic: bool = False,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # optional heavy backend, loaded on use

        if model is None or model == "":
            raise ValueError("the transformers backend needs a model: a Hugging Face id, a local folder, or a loaded model")
        self.device = auto_device(device)
        if isinstance(model, str):
            torch_dtype = {"auto": (torch.bfloat16 if self.device.type == "cuda" else torch.float32),
                           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
                model_obj = AutoModelForCausalLM.from_pretrained(
                    model, trust_remote_code=trust_remote_code, **_dtype_kwarg(torch_dtype), **_placement(self.device)
                )
            except OSError as e:
                raise BackendError(
                    f"cannot load the language model {model!r}: {e}. Download it on a machine with internet access "
                    "(huggingface-cli download ...) and pass its local folder as the model", fatal=True
                ) from e
            self.model = model
        else:
            model_obj = model
            self.model = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise ValueError("pass the tokenizer along with a loaded model")
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues right after each prompt
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = model_obj.to(self.device).eval()  # no copy for weights device_map put there already
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        configured = getattr(getattr(self.lm, "generation_config", None), "top_k", None)
        self.top_k = int(top_k if top_k is not None else configured if configured is not None else GENERATE_TOP_K)
        self.deterministic = bool(deterministic)
        self._stats = {"batches": 0, "requests": 0, "generated_tokens": 0}

    def sampling(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "deterministic": self.deterministic,
                "batch_size": self.batch_size if self.deterministic else None}

    def stats(self) -> dict:
        return dict(self._stats)

    def render(self, messages: list[dict]) -> str:
        """The prompt string the model sees (chat template with the generation prompt appended)."""
        global _FALLBACK_WARNED
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not _FALLBACK_WARNED:
            warnings.warn(f"tokenizer of {self.model!r} has no chat template; using a plain 'role: content' layout")
            _FALLBACK_WARNED = True
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    @torch.no_grad()
    def complete(self, requests: list[ChatRequest]) -> list[str | BackendError]:
        out: list[str | BackendError] = []
        for i in range(0, len(requests), self.batch_size):
            out.extend(self._batch(requests[i : i + self.batch_size]))
        return out

    def _batch(self, requests: list[ChatRequest]) -> list[str]:
        prompts = [self.render(r.messages) for r in requests]
        # the template already holds BOS etc.; adding special tokens again would double them
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.temperature > 0
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=sample, pad_token_id=self.tokenizer.pad_token_id)
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.deterministic):
            if self.deterministic:
                seeds = ",".join(str(r.params.get("seed")) for r in requests)
                torch.manual_seed(int(hashlib.sha256(seeds.encode()).hexdigest()[:15], 16))
            gen = self.lm.generate(**enc, **kwargs)
        new = gen[:, enc["input_ids"].shape[1] :]
        self._stats["batches"] += 1
        self._stats["requests"] += len(requests)
        self._stats["generated_tokens"] += int((new != self.tokenizer.pad_token_id).sum())
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
