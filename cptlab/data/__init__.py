"""The data layer's public API: corpora, tokenizers, tokenised shards and the replay batch sampler.

The pieces live in ``corpus`` (registry, user data, train/validation split), ``packs`` (the docs pack, built
from pinned Debian packages), ``extract`` (text out of documentation files), ``tokenizer``, ``shards``
(tokenised memmaps, the corpora table) and ``sampler`` (compute-equivalent replay).
"""

from cptlab.data.checks import DataError
from cptlab.data.corpus import SHIPPED, Registry, cache_root, split_mask
from cptlab.data.sampler import BatchSampler
from cptlab.data.shards import corpora_table, print_corpora_table, shard_meta, token_shard, val_tokens
from cptlab.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "SHIPPED", "BatchSampler", "DataError", "Registry", "Tokenizer", "cache_root", "corpora_table",
    "load_tokenizer", "print_corpora_table", "shard_meta", "split_mask", "token_shard", "train_bpe",
    "val_tokens",
]
