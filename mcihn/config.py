"""MCIHN's configuration: sizes (paper section 4.3), the head, ablation switches and loss weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mcihn.spec import MODALITIES

# The paper's ablations (section 4.6, Table 3) by their names in the paper.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "-VT": {"modalities": ("vision", "text")},
    "-VA": {"modalities": ("vision", "audio")},
    "-TA": {"modalities": ("text", "audio")},
    "MCIHN-1": {"use_aae": False},  # no adversarial autoencoders
    "MCIHN-2": {"use_cgmm": False},  # no cross-modal gate mechanism
    # Not an ablation of the paper: its literal reading of eqs. 12-14 and 19 (docs/model.md, departures).
    "literal-eq12-14": {"mmd_kernel_map": "minimised", "adaptive_loss_weight": 1.0},
}

# How the MMD's kernel map xi (eq. 12) is trained: "adversarial" ascends the MMD through a gradient reversal
# (ours); "minimised" descends it like every other parameter (the paper's literal reading, which lets xi
# collapse towards a constant map with zero MMD).
KERNEL_MAPS = ("adversarial", "minimised")


@dataclass
class MCIHNConfig:
    """Everything needed to rebuild an MCIHN model; saved in checkpoints as JSON.

    Defaults are the paper's (section 4.3): vision 10x512 (CLIP), text 36x768 (BERT), audio 128x512
    (Wav2Vec2), latent codes 32x256, dropout 0.5.
    """

    input_dims: dict[str, int] = field(default_factory=lambda: {"vision": 512, "text": 768, "audio": 512})
    seq_lens: dict[str, int] = field(default_factory=lambda: {"vision": 10, "text": 36, "audio": 128})
    latent_len: int = 32
    latent_dim: int = 256
    num_heads: int = 8
    dropout: float = 0.5
    head: str = "regression"  # "regression" (one value) or "classification" (softmax over labels)
    labels: list[str] = field(default_factory=list)
    # Ablation switches.
    modalities: tuple[str, ...] = MODALITIES
    use_aae: bool = True
    use_cgmm: bool = True
    # Loss weights. The paper sums L(Adp) and L(Mul) (eq. 19); the weight is a tuned hyper-parameter.
    adaptive_loss_weight: float = 0.1
    mmd_kernel_scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    mmd_kernel_map: str = "adversarial"  # one of KERNEL_MAPS
    # Dropout on the fusion attention's weights (eq. 15). None: `dropout`, as before this field existed; the
    # paper's literal reading has none (0.0).
    fusion_attention_dropout: float | None = None
    # Training-time robustness: probability of hiding each present modality of a sample (at least one stays).
    modality_dropout: float = 0.15

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.mmd_kernel_scales = tuple(self.mmd_kernel_scales)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(self.modalities) < 2 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be two or three distinct of {MODALITIES}, got {self.modalities}")
        if self.head not in ("regression", "classification"):
            raise ValueError(f"head must be 'regression' or 'classification', got {self.head!r}")
        if self.head == "classification" and len(self.labels) < 2:
            raise ValueError("a classification head needs at least two label names (labels=[...])")
        if self.mmd_kernel_map not in KERNEL_MAPS:
            raise ValueError(f"mmd_kernel_map must be one of {KERNEL_MAPS}, got {self.mmd_kernel_map!r}")
        if self.latent_dim % self.num_heads:
            raise ValueError(f"latent_dim {self.latent_dim} must be divisible by num_heads {self.num_heads}")
        for m in MODALITIES:
            if self.input_dims.get(m, 0) <= 0 or self.seq_lens.get(m, 0) <= 0:
                raise ValueError(f"input_dims and seq_lens need a positive entry for {m}")

    @property
    def num_outputs(self) -> int:
        return 1 if self.head == "regression" else len(self.labels)

    @property
    def fusion_attention_dropout_rate(self) -> float:
        return self.dropout if self.fusion_attention_dropout is None else self.fusion_attention_dropout

    @classmethod
    def for_ablation(cls, name: str, **overrides) -> MCIHNConfig:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; choose one of {', '.join(ABLATIONS)}")
        return cls(**{**ABLATIONS[name], **overrides})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        data["mmd_kernel_scales"] = list(self.mmd_kernel_scales)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MCIHNConfig:
        """Fields missing from `data` (a checkpoint written before they existed) take their defaults, which
        reproduce the behaviour of that time."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MCIHN config fields {unknown}; was the checkpoint made by a newer version?")
        return cls(**data)
