"""PIP-MM's prompt side: the prompt vector from the frozen LLM, and the prompt MLP that maps it to T-CLS.

    prompt ids [B,T] --frozen LLM--> hidden at `layer`, last position [B,D_llm]
               --PromptMLP: Linear(D_llm,D_mid) -> GELU -> Linear(D_mid,D_vit)--> T-CLS [B,D_vit]

T-CLS replaces the ViT's class embedding per sample (vision.py). The MLP is the only new,
trainable part; its weights live in `prompt_mlp.safetensors` with `prompt_mlp.json` beside them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sdk.errors import ExportError

WEIGHTS_FILE = "prompt_mlp.safetensors"
CONFIG_FILE = "prompt_mlp.json"


@dataclass
class PromptMLPConfig:
    d_llm: int  # LLM hidden size (input)
    d_vit: int  # ViT hidden size (output: the class-token slot)
    d_mid: int = 0  # hidden width; 0 means d_vit
    # Which LLM hidden state is the prompt vector: -1 is the last layer after the final norm;
    # k >= 0 is the output of decoder layer k (hidden_states[k + 1] in transformers' numbering).
    prompt_layer: int = -1
    # "last": the hidden state of the last prompt token (the paper's choice); "mean": average over the prompt.
    pooling: str = "last"

    def __post_init__(self):
        if self.d_mid <= 0:
            self.d_mid = self.d_vit
        if self.pooling not in ("last", "mean"):
            raise ExportError(f"prompt MLP pooling must be 'last' or 'mean', not {self.pooling!r}")


class PromptMLP(nn.Module):
    def __init__(self, config: PromptMLPConfig):
        super().__init__()
        self.config = config
        self.fc1 = nn.Linear(config.d_llm, config.d_mid)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.d_mid, config.d_vit)

    def forward(self, prompt_vector: torch.Tensor) -> torch.Tensor:
        # [B, D_llm] -> [B, D_vit]
        return self.fc2(self.act(self.fc1(prompt_vector)))

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory / WEIGHTS_FILE

    @classmethod
    def load(cls, path: str | Path) -> "PromptMLP":
        """Load from a directory holding the pair of files, or from the safetensors file itself."""
        from safetensors.torch import load_file

        path = Path(path)
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        config_path = weights.with_name(CONFIG_FILE)
        if not weights.is_file():
            raise ExportError(f"prompt MLP weights not found at {weights}: pass the {WEIGHTS_FILE} file or its folder")
        if not config_path.is_file():
            raise ExportError(f"prompt MLP config {config_path} is missing: it must lie beside {weights.name}")
        try:
            config = PromptMLPConfig(**json.loads(config_path.read_text()))
        except (TypeError, ValueError) as err:
            raise ExportError(f"prompt MLP config {config_path} is invalid ({err}): re-save it with PromptMLP.save") from err
        mlp = cls(config)
        try:
            mlp.load_state_dict(load_file(str(weights)))
        except Exception as err:  # wrong shapes or keys
            raise ExportError(f"prompt MLP weights {weights} do not match its config ({err})") from err
        return mlp


def prompt_vector(language_model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  layer: int = -1, pooling: str = "last") -> torch.Tensor:
    """The frozen LLM's hidden state of the prompt: [B,T,D_llm] embeddings -> [B,D_llm].

    Prompts are left-padded in a batch, so the last position is every row's last prompt token.
    """
    out = language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         output_hidden_states=layer != -1, use_cache=False)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer + 1]
    if pooling == "mean":
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return hidden[:, -1]
