"""Describe stage: domain prompts, LLM and template backends, resumable generation, 77-token summaries.

    from workbench.describe import generate_descriptions, summarize, import_long_captions
    res = generate_descriptions(ds, backend="openai", model="gpt-4o-mini", domain="birds",
                                n_per_class=6, run_dir="reports/cub")
    captions = summarize([r["text"] for r in res.records], [r["class"] for r in res.records], tokenizer="ViT-B-32")
"""
from .backend import BACKENDS, BackendError, ChatBackend, ChatRequest, RecordBackend, make_backend
from .generate import DescribeResult, DescriptionsIncomplete, generate_descriptions
from .gist_io import import_long_captions, read_long_captions
from .prompts import PROMPT_SETS, PromptSet, domain_for_dataset, get_prompt_set
from .stage import backend_from_params, run, token_report
from .summarize import extractive_summary, summarize
from .validate import Validator

__all__ = [
    "BACKENDS", "BackendError", "ChatBackend", "ChatRequest", "RecordBackend", "make_backend",
    "DescribeResult", "DescriptionsIncomplete", "generate_descriptions",
    "import_long_captions", "read_long_captions",
    "PROMPT_SETS", "PromptSet", "domain_for_dataset", "get_prompt_set",
    "backend_from_params", "run", "token_report",
    "extractive_summary", "summarize", "Validator",
]
