"""--push_to_hub (HF Trainer's spellings): the final model, and with --hub_strategy checkpoint each saved checkpoint
(as `last-checkpoint/`, replaced at each save), uploaded to a Hub model repository through huggingface_hub.

The token and the Hub are checked, and the repository created, before training starts: a missing token, a rejected
one or an unreachable Hub is one error line then, never after hours of training. A failed upload leaves the local
run as it is and says how to retry; a failed checkpoint upload does not stop training (the next save tries again)."""

import shlex
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from ttt_train import hub
from ttt_train.cli import UserError

CHECKPOINT_FOLDER = "last-checkpoint"  # where --hub_strategy checkpoint puts the newest checkpoint (as HF Trainer)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def retry_command(folder: Path, repo_id: str, path_in_repo: str = ".") -> str:
    return shlex.join(["hf", "upload", repo_id, str(folder), path_in_repo])


def prepare(settings, output_dir: Path) -> str:
    """The repository's id (`settings`: ttt_train.config.HubArguments), after checking the token and the account
    it belongs to, and creating the repository (if new); or one UserError. The main process calls it before training."""
    token = get_token()
    if not token:
        raise UserError("--push_to_hub: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN "
                        "(a token with write access)")
    api = HfApi(endpoint=hub.endpoint(), token=token)
    try:
        user = api.whoami()["name"]
    except HfHubHTTPError as error:
        raise UserError(f"--push_to_hub: the Hub at {hub.endpoint()} refused the token: {first_line(error)}") \
            from error
    except Exception as error:  # connection refused, DNS, timeouts, offline mode: the Hub cannot be reached
        raise UserError(f"--push_to_hub: the Hub at {hub.endpoint()} cannot be reached ({first_line(error)}); "
                        f"train without --push_to_hub and upload later with `hf upload`") from error
    repo_id = settings.hub_model_id or f"{user}/{Path(output_dir).name}"
    try:
        api.create_repo(repo_id, private=settings.hub_private_repo, exist_ok=True, repo_type="model")
    except Exception as error:
        raise UserError(f"--push_to_hub: cannot create or use the repository {repo_id}: {first_line(error)}") \
            from error
    return repo_id


class Publisher:
    """Uploads to the repository `prepare` checked (the main process)."""

    def __init__(self, repo_id: str, strategy: str):
        self.repo_id, self.strategy = repo_id, strategy
        self.api = HfApi(endpoint=hub.endpoint(), token=get_token())

    def upload(self, folder: Path, path_in_repo: str, message: str) -> str | None:
        """Uploads `folder`; None, or the error line (with the command that retries it)."""
        try:
            self.api.upload_folder(repo_id=self.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                                   commit_message=message, delete_patterns="*" if path_in_repo != "." else None)
        except Exception as error:  # HTTP, connection and timeout errors alike: the local folder is untouched
            return (f"--push_to_hub: uploading {folder} to {self.repo_id} failed ({first_line(error)}); the run's "
                    f"files are intact; retry with: {retry_command(folder, self.repo_id, path_in_repo)}")
        return None

    def checkpoint_saved(self, folder: Path, step: int, report=print):
        if self.strategy == "checkpoint":
            failure = self.upload(folder, CHECKPOINT_FOLDER, f"checkpoint at step {step}")
            if failure:
                report(f"warning: {failure}")

    def final_model_saved(self, folder: Path, step):
        """Uploads the final model (`step`: its step, or words); a failure is one UserError."""
        failure = self.upload(folder, ".", f"final model, step {step}" if isinstance(step, int) else str(step))
        if failure:
            raise UserError(failure)
