"""The CLIP layer every stage uses: loading (:mod:`.load`), batched encoding (:mod:`.encode`), the one
text-tower forward and token counting (:mod:`.text`), and the one feature cache (:mod:`.features`).
It knows nothing of stages, run directories or notebooks."""
from .encode import (
    autocast,
    channel_constants,
    default_batch_size,
    encode_images,
    encode_texts,
    encode_uint8,
    model_device,
    normalize_images,
    output_tokens,
    uses_bf16,
)
from .features import image_features, text_features, weights_digest
from .load import (
    ALIASES,
    CLIPBundle,
    WeightsUnavailableError,
    auto_device,
    image_size,
    load_clip,
    load_state_dict,
    resolve_name,
)
from .text import (
    context_length,
    count_tokens,
    get_tokenizer,
    plain_text_tower,
    text_forward,
    token_counter,
    token_lengths,
    token_mask,
    trim,
)

__all__ = [
    "ALIASES", "CLIPBundle", "WeightsUnavailableError", "auto_device", "autocast", "channel_constants", "context_length",
    "count_tokens", "default_batch_size", "encode_images", "encode_texts", "encode_uint8", "get_tokenizer", "image_features",
    "image_size", "load_clip", "load_state_dict", "model_device", "normalize_images", "output_tokens",
    "plain_text_tower", "resolve_name", "text_features", "text_forward", "token_counter", "token_lengths",
    "token_mask", "trim", "uses_bf16", "weights_digest",
]
