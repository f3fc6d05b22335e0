"""Where numbers go: `<log-dir>/metrics.jsonl`, `recovery.jsonl`, and wandb (the console
is gemini_lm.log's).

Only the logging rank (global rank 0) writes. wandb is optional and offline unless the
user has configured it (an API key or WANDB_MODE), so a run never needs an account.
The wandb run id is derived from the job id, so a restarted worker resumes the same run.
"""
from __future__ import annotations

import os
import time

from gemini_lm.log import get_logger
from gemini_lm.resilience.events import append_jsonl as _append_jsonl

log = get_logger(__name__)


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc, errors="ignore").read()


class MetricsLogger:
    def __init__(self, log_dir: str, *, enabled: bool, wandb_project: str | None = None,
                 wandb_exp_name: str | None = None, wandb_save_dir: str | None = None,
                 run_id: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.log_dir = log_dir
        self.metrics_path = os.path.join(log_dir, "metrics.jsonl")
        self.recovery_path = os.path.join(log_dir, "recovery.jsonl")
        self._wandb = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if wandb_project:
            import wandb  # slow import: only when asked for

            mode = None if _wandb_configured() else "offline"
            # wandb writes into <dir>/wandb/ itself (Megatron's --wandb-save-dir is that dir too)
            save_dir = wandb_save_dir or log_dir
            os.makedirs(save_dir, exist_ok=True)
            # One job, one run: the id is the job's, so a restart resumes the same run.
            self._wandb = wandb.init(project=wandb_project, name=wandb_exp_name, dir=save_dir,
                                     id=run_id, resume="allow" if run_id else None,
                                     mode=mode, config=config, settings=wandb.Settings(silent=True))
            if mode == "offline":   # wandb is silenced; say once where the run went
                runs = os.path.join(save_dir, "wandb", f"offline-run-*-{self._wandb.id}")
                log.info(f"wandb: offline run {self._wandb.id} in {os.path.dirname(self._wandb.dir)} "
                         f"(each restart adds a directory of the same run; upload them as one run "
                         f"with `wandb sync {runs}`)")
            # Plot against our iteration, not wandb's own step: after a recovery the run
            # resumes and logs iterations again that wandb's monotonic step would drop.
            self._wandb.define_metric("iteration")
            for section in ("train", "valid", "recovery"):
                self._wandb.define_metric(f"{section}/*", step_metric="iteration")

    def log_iteration(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        _append_jsonl(self.metrics_path, record)
        if self._wandb is not None:
            self._wandb.log({"iteration": record["iteration"],
                             **{f"train/{k}": v for k, v in record.items()
                                if isinstance(v, (int, float)) and k != "iteration"}})

    def log_eval(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        _append_jsonl(self.metrics_path, {"time": time.time(), "iteration": iteration,
                                          **{f"valid_{k}": v for k, v in values.items()}})
        if self._wandb is not None:
            self._wandb.log({"iteration": iteration, **{f"valid/{k}": v for k, v in values.items()}})

    def log_recovery(self, record: dict) -> None:
        if not self.enabled:
            return
        _append_jsonl(self.recovery_path, record)
        if self._wandb is not None:
            values = {f"recovery/{k}": v for k, v in record.items()
                      if isinstance(v, (int, float)) and k != "iteration"}
            if "iteration" in record:
                values["iteration"] = record["iteration"]
            self._wandb.log(values)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
