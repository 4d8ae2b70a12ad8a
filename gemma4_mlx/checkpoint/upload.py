"""Uploading a converted checkpoint to the Hugging Face Hub (``convert --upload-repo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import CheckpointError


def check_repo_id(repo_id: str) -> None:
    """Refuse a repo id the Hub would refuse, before anything is converted."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise CheckpointError(f"--upload-repo {repo_id!r}: not a Hugging Face repo id "
                              f"({str(e).splitlines()[0]})") from None


def write_model_card(folder: Path, repo_id: str, base_model: Optional[str],
                     quantization: Optional[Dict[str, Any]]) -> None:
    """README.md for the Hub: where the weights came from and how to run them."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="mlx", pipeline_tag="text-generation", tags=["mlx", "gemma4"],
                         base_model=base_model)
    bits = f", {quantization.get('bits')}-bit {quantization.get('mode', 'affine')}" if quantization else ""
    source = f" from [{base_model}](https://huggingface.co/{base_model})" if base_model else ""
    body = (f"# {repo_id}\n\nGemma 4 text model converted to MLX{source} with gemma4-mlx{bits}.\n\n"
            "```sh\npip install gemma4-mlx\n"
            f"gemma4-mlx generate --model {repo_id} --prompt \"Hello\"\n```\n\n"
            "The folder is also an mlx-lm checkpoint (`mlx_lm.load`).\n")
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def upload_folder(folder: Path, repo_id: str) -> None:
    """Create ``repo_id`` if needed and upload ``folder`` to it in one commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload a Gemma 4 checkpoint converted with gemma4-mlx")
    except Exception as e:  # network, auth and HTTP errors come in many types
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: written, but the upload to {repo_id} failed ({type(e).__name__}: {why}); "
                              f"upload it with `hf upload {repo_id} {folder}`") from e
