"""Describe stage: domain prompts, LLM and template backends, resumable generation, 77-token summaries.

    from workbench.describe import generate_descriptions, summarize, import_long_captions
    res = generate_descriptions(ds, backend="openai", model="gpt-4o-mini", domain="birds",
                                n_per_class=6, run_dir="reports/cub")
    captions = summarize([r["text"] for r in res.records], [r["class"] for r in res.records], tokenizer="ViT-B-32")
"""
from .backend import (
    BACKENDS,
    BackendError,
    ChatBackend,
    ChatRequest,
    RecordBackend,
    backend_from_params,
    make_backend,
)
from .generate import DescribeResult, DescriptionsIncomplete, generate_descriptions
from .gist_io import import_long_captions, match_classnames, read_long_captions
from .prompts import PROMPT_SETS, PromptSet, domain_for_dataset, get_prompt_set
from .summarize import extractive_summary, summarize, token_counter, token_lengths
from .validate import Validator, norm_name

__all__ = [
    "BACKENDS", "BackendError", "ChatBackend", "ChatRequest", "RecordBackend", "backend_from_params", "make_backend",
    "DescribeResult", "DescriptionsIncomplete", "generate_descriptions",
    "import_long_captions", "match_classnames", "read_long_captions",
    "PROMPT_SETS", "PromptSet", "domain_for_dataset", "get_prompt_set",
    "extractive_summary", "summarize", "token_counter", "token_lengths",
    "Validator", "norm_name",
]
