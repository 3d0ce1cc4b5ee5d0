"""Bi-encoder: a Hugging Face ``AutoModel`` with mean pooling and L2 normalisation.

The same weights load three ways: :meth:`Encoder.load` here, ``sentence_transformers
.SentenceTransformer(path)`` and ``transformers.AutoModel.from_pretrained(path)``, because
:meth:`Encoder.save` writes the plain Hugging Face files plus sentence-transformers' module files
(Transformer -> mean Pooling -> Normalize, as all-MiniLM-L6-v2 ships).

An asymmetric model (a job with ``encoder.query_tower=frozen``) is saved as sentence-transformers
writes a ``Router`` model: ``modules.json`` is Router -> mean Pooling -> Normalize,
``router_config.json`` routes the ``query`` task to ``query_0_Transformer/`` and the ``document``
task (the default) to ``document_0_Transformer/``, and each of those two subfolders is a complete
model in the layout above. ``SentenceTransformer(path).encode_query`` then embeds with the query
tower and ``encode_document`` (and plain ``encode``) with the document tower;
``AutoModel.from_pretrained(path, subfolder="document_0_Transformer")`` loads one tower (the root
holds no ``config.json``). :meth:`Encoder.load` gives the document tower, :meth:`Encoder.load_query`
the query tower (the model itself when it has no query tower, so every caller that encodes
queries uses it). Models saved before the Router layout (the document tower at the root, the
query tower in ``query_encoder/``) still load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from whetstone.config.base import StorageConfig

# Subfolders of an asymmetric (Router) model, named as sentence-transformers' Router.save names them.
TOWER_FOLDERS = {"query": "query_0_Transformer", "document": "document_0_Transformer"}
QUERY_TOWER = TOWER_FOLDERS["query"]
LEGACY_QUERY_TOWER = "query_encoder"  # the query tower's subfolder in models saved before the Router layout
ROUTER_CONFIG = "router_config.json"
# Module classes as sentence-transformers 5 and 6 both import them.
_ST_TYPES = {name: f"sentence_transformers.models.{name}" for name in ("Router", "Transformer", "Pooling", "Normalize")}


def write_sentence_transformers_files(folder: str | Path, dim: int, max_seq_length: int) -> None:
    """Write the module files that make ``folder`` a sentence-transformers model (mean pooling)."""
    folder = Path(folder)
    _write_pooling_files(folder, dim, first=_ST_TYPES["Transformer"])
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2)
    )
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2)
    )


def write_router_files(folder: str | Path, dim: int) -> None:
    """Write the module files of an asymmetric sentence-transformers model: a ``Router`` whose
    ``query`` and ``document`` routes are the transformers in :data:`TOWER_FOLDERS`, then mean
    pooling and normalisation (what ``SentenceTransformer.save`` writes for such a model)."""
    folder = Path(folder)
    _write_pooling_files(folder, dim, first=_ST_TYPES["Router"])
    router = {
        "types": {TOWER_FOLDERS[route]: _ST_TYPES["Transformer"] for route in ("query", "document")},
        "structure": {route: [TOWER_FOLDERS[route]] for route in ("query", "document")},
        "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}},
    }
    (folder / ROUTER_CONFIG).write_text(json.dumps(router, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"similarity_fn_name": "cosine", "prompts": {"query": "", "document": ""}, "default_prompt_name": None},
        indent=2))


def _write_pooling_files(folder: Path, dim: int, first: str) -> None:
    """``modules.json`` (``first`` -> mean Pooling -> Normalize) and the pooling module's files."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": first},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_TYPES["Pooling"]},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_TYPES["Normalize"]},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "2_Normalize").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))


def tower_folder(folder: str | Path, route: str) -> Path | None:
    """The local folder that holds one tower of a saved model: ``route`` ``"document"`` (the
    model itself when it is symmetric) or ``"query"`` (None when the model has no query tower).

    Reads the Router layout (``router_config.json``) and the older one (``query_encoder/``).
    """
    if route not in TOWER_FOLDERS:
        raise ValueError(f"route must be one of {sorted(TOWER_FOLDERS)}, got {route!r}")
    folder = Path(folder)
    router = folder / ROUTER_CONFIG
    if router.is_file():
        structure = json.loads(router.read_text())["structure"]
        if route not in structure:
            raise ValueError(f"{folder}: the Router model has no {route!r} route (routes: {sorted(structure)})")
        return folder / structure[route][0]
    if route == "document":
        return folder
    legacy = folder / LEGACY_QUERY_TOWER
    return legacy if (legacy / "config.json").is_file() else None


def set_dropout(module: nn.Module, p: float) -> int:
    """Set the probability of every ``nn.Dropout`` under ``module`` (hidden states and attention
    probabilities alike); returns how many were set. Dropout still acts only in train mode."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    layers = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states that the mask keeps.

    Args:
        hidden: (B, L, H) last hidden states.
        attention_mask: (B, L) 1 for real tokens.

    Returns:
        (B, H) pooled states.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    summed = (hidden * mask).sum(dim=1)  # (B, H)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """A ``"float32"``/``"bfloat16"``/``"float16"`` config value -> the dtype to autocast to (None:
    no autocast). float16 is for GPUs (half precision inference)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision or "float32")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Encoder(nn.Module):
    """Transformer + mean pooling + L2 normalisation (optionally truncated to a Matryoshka dim).

    ``forward`` takes token tensors and returns unit-norm embeddings; ``encode`` takes strings,
    batches them by length (less padding) and returns a float32 numpy array.
    """

    def __init__(self, transformer: nn.Module, tokenizer, max_seq_length: int = 256):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        # Mean pooling never uses BERT-style pooler heads; frozen, DDP does not wait for their grads.
        for name, param in transformer.named_parameters():
            if name.startswith("pooler."):
                param.requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, storage: StorageConfig | None = None
    ) -> Encoder:
        """Load from a local folder or a storage URI (``s3://...`` is downloaded to a temp dir); an
        asymmetric model gives its document tower."""
        from whetstone.models.assets import localize

        path = str(tower_folder(localize(str(path), storage), "document"))
        transformer = AutoModel.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        max_len = 256
        st_config = Path(path) / "sentence_bert_config.json"
        if st_config.is_file():
            max_len = int(json.loads(st_config.read_text()).get("max_seq_length", max_len))
        encoder = cls(transformer, tokenizer, max_seq_length=max_len)
        # Eval mode all the way down (from_pretrained leaves only the transformer in it): a trainer
        # turns train mode on explicitly, and encode() restores exactly the mode it found.
        return encoder.to(device or default_device()).eval()

    @classmethod
    def load_query_tower(
        cls, path: str | Path, device: str | torch.device | None = None, storage: StorageConfig | None = None
    ) -> Encoder | None:
        """The query tower of an asymmetric model; None for a symmetric one."""
        from whetstone.models.assets import localize

        tower = tower_folder(localize(str(path), storage), "query")
        return cls.load(tower, device=device) if tower is not None else None

    @classmethod
    def load_query(
        cls, path: str | Path, device: str | torch.device | None = None, storage: StorageConfig | None = None
    ) -> Encoder:
        """The encoder for queries: an asymmetric model's query tower, else the model itself."""
        tower = cls.load_query_tower(path, device=device, storage=storage)
        return tower if tower is not None else cls.load(path, device=device, storage=storage)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        dim: int | None = None,
        autocast: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Embed token ids.

        Args:
            input_ids: (B, L) token ids.
            attention_mask: (B, L).
            dim: keep only the first ``dim`` coordinates before normalising (Matryoshka).
            autocast: run the transformer under autocast to this dtype (e.g. ``torch.bfloat16``);
                pooling and normalisation stay float32, as do the weights and their gradients.

        Returns:
            (B, dim or H) unit-norm float32 embeddings.
        """
        # None leaves any caller's own autocast context in force.
        context = nullcontext() if autocast is None else torch.autocast(input_ids.device.type, dtype=autocast)
        with context:
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = mean_pool(hidden.float(), attention_mask)  # (B, H)
        if dim is not None:
            pooled = pooled[:, :dim]
        return F.normalize(pooled, dim=-1)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenise with padding to the longest text in ``texts`` (not to ``max_length``)."""
        return self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.max_seq_length,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        max_length: int | None = None,
        dim: int | None = None,
        dtype: str | None = None,
    ) -> np.ndarray:
        """Embed strings in length-sorted batches.

        ``dtype="bfloat16"`` runs under autocast: about 1.6x faster on CPUs with AVX-512 BF16
        (cosine to the float32 vectors above 0.9999 on MiniLM), meant for mining indexes.

        Returns:
            (N, D) float32 unit-norm embeddings, in the order of ``texts``.
        """
        was_training = self.training
        self.eval()
        texts = list(texts)
        if not texts:
            return np.zeros((0, dim or self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), dim or self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            tokens = self.tokenize([texts[i] for i in idx], max_length)
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            emb = self(tokens["input_ids"], tokens["attention_mask"], dim=dim, autocast=autocast_dtype(dtype))
            out[idx] = emb.cpu().numpy()
        self.train(was_training)
        return out

    def save(self, path: str | Path, query_tower: Encoder | None = None) -> Path:
        """Save so that Encoder.load, SentenceTransformer(path) and AutoModel.from_pretrained load it.

        With ``query_tower`` (an asymmetric model's) the folder is a sentence-transformers Router
        model: this encoder in ``document_0_Transformer/``, the query tower in
        ``query_0_Transformer/`` (each a complete model in the symmetric layout), the Router's
        files at the root (see the module docstring).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if query_tower is not None:
            if query_tower.dim != self.dim:
                raise ValueError(f"the query tower's width {query_tower.dim} differs from the document "
                                 f"tower's {self.dim}")
            self.save(path / TOWER_FOLDERS["document"])
            query_tower.save(path / TOWER_FOLDERS["query"])
            write_router_files(path, self.dim)
            return path
        self.transformer.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        write_sentence_transformers_files(path, self.dim, self.max_seq_length)
        return path
