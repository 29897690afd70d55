"""The describe stage (``01_describe``): its parameter section in, ``descriptions.jsonl`` and
``metrics.json["describe"]`` out."""
from __future__ import annotations

from pathlib import Path

from ..clip.text import context_length, get_tokenizer
from ..data import Dataset, load_dataset
from ..params import Params
from ..runs import locked, update_metrics
from . import report
from .backend import ChatBackend, RecordBackend, make_backend
from .generate import DescribeResult, generate_descriptions
from .prompts import domain_for_dataset


def backend_from_params(p: Params) -> ChatBackend | RecordBackend:
    """The backend the stage's parameters name, each backend configured from the parameters it takes."""
    if p.backend == "openai":
        return make_backend("openai", model=p.llm, api_base=p.api_base, api_key_env=p.api_key_env,
                            max_concurrency=p.max_concurrency, temperature=p.temperature, top_p=p.top_p,
                            max_tokens=p.max_tokens, timeout=p.timeout_s, max_retries=p.max_retries)
    if p.backend == "transformers":
        return make_backend("transformers", model=p.llm, device=p.device, batch_size=p.batch_size,
                            max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                            deterministic=p.deterministic)
    if p.backend == "import":
        return make_backend("import", path=p.long_captions)
    if p.backend == "attributes":
        return make_backend("attributes", root=p.attributes_root or p.data_root)
    return make_backend(p.backend)


@locked
def run(p: Params, ds: Dataset | None = None) -> DescribeResult:
    """Generate (or resume) the run's descriptions with the configured backend and prompts."""
    ds = ds if ds is not None else load_dataset(p.dataset, p.data_root, **p.dataset_options)
    return generate_descriptions(
        ds, backend_from_params(p), domain=p.domain or domain_for_dataset(p.dataset), noun=p.domain_noun,
        n_per_class=p.per_class, run_dir=p.run_dir, seed=p.sampling_seed, max_attempts=p.max_attempts, progress=p.progress,
    )


@locked
def token_report(p: Params, result: DescribeResult):
    """Description and summary lengths in the CLIP tokens of ``p.model``: ``(table, figure, summary)``;
    the figure goes to ``figures/describe_token_lengths.png``, the summary to ``metrics.json``, with
    ``summaries``: how many extractive summaries fell back from whole clauses, and why. (The captions
    the match stage summarizes are counted in ``metrics.json["matching"]["summaries"]``.)"""
    tok = get_tokenizer(p.model)
    summaries: dict = {}
    lengths = report.length_stats(result.records, tok, stats=summaries)
    limit = context_length(tok)
    fig = report.plot_token_lengths(lengths, limit=limit, path=Path(p.run_dir) / "figures" / "describe_token_lengths.png")
    tokens = report.token_summary(lengths, limit)
    update_metrics(p.run_dir, "describe", {**result.metrics, "tokens": tokens, "summaries": summaries})
    return lengths, fig, tokens
