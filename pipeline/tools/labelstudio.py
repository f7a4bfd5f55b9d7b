"""Push predictions into a running Label Studio over its REST API.

Each ok row becomes one prediction (brush-label regions, one per class present, the same
results `export --format label-studio` writes) on the project's task whose ``data.image``
equals the row's image reference (its ``uri``, or ``url_prefix`` + image id); rows with no
such task become new tasks carrying their prediction. Only HTTP is used (`requests`):
label-studio-sdk pins older numpy and OpenCV than the pipeline needs, so it is not a
dependency.

Authentication: an API token (``LABEL_STUDIO_API_KEY``): a personal access token (a JWT,
exchanged at ``/api/token/refresh`` for a short-lived access token) or a legacy token
(sent as ``Authorization: Token ...``). The token is never logged or written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pipeline.errors import JobError
from pipeline.store.reader import count_errors, iter_mask_rows, select_identity
from pipeline.tools.export import label_studio_task

PAGE_SIZE = 100
IMPORT_BATCH = 50


class LabelStudioError(JobError):
    """Label Studio refused or could not be reached; the message names the URL and the fix."""


@dataclass(frozen=True)
class PushResult:
    project: int
    attached: int      # predictions added to existing tasks
    created: int       # tasks created with their prediction
    already: int       # tasks that already held this model identity's prediction
    skipped_errors: int

    def summary(self) -> str:
        return (f"pushed {self.attached + self.created} predictions to Label Studio project "
                f"{self.project}: {self.attached} on existing tasks, {self.created} new tasks"
                + (f", {self.already} already there" if self.already else "")
                + (f" ({self.skipped_errors} error rows skipped)" if self.skipped_errors else ""))


class LabelStudioClient:
    """The few endpoints a push needs, with the token handled once."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0) -> None:
        import requests

        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if not token:
            raise LabelStudioError("no Label Studio token: set LABEL_STUDIO_API_KEY (Account & "
                                   "Settings > Access Token in Label Studio) or pass --token")
        if token.count(".") == 2:  # a personal access token (JWT refresh token)
            access = self._call("POST", "/api/token/refresh/", json={"refresh": token},
                                auth=False)["access"]
            self.session.headers["Authorization"] = f"Bearer {access}"
        else:
            self.session.headers["Authorization"] = f"Token {token}"

    def _call(self, method: str, path: str, *, auth: bool = True, **kwargs):
        import requests

        try:
            response = self.session.request(method, self.url + path, timeout=self.timeout,
                                            **kwargs) if auth else \
                requests.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise LabelStudioError(f"Label Studio at {self.url}: cannot be reached "
                                   f"({type(exc).__name__}); check --url") from None
        if response.status_code in (401, 403):
            raise LabelStudioError(f"Label Studio at {self.url}: {method} {path} was refused "
                                   f"(HTTP {response.status_code}); check the token")
        if response.status_code == 404:
            raise LabelStudioError(f"Label Studio at {self.url}: {path} not found "
                                   "(HTTP 404); check --project")
        if response.status_code >= 400:
            raise LabelStudioError(f"Label Studio at {self.url}: {method} {path} failed "
                                   f"(HTTP {response.status_code}: {response.text[:300]})")
        return response.json() if response.content else None

    def project(self, project: int) -> dict:
        return self._call("GET", f"/api/projects/{project}")

    def tasks(self, project: int) -> Iterator[dict]:
        page = 1
        while True:
            body = self._call("GET", "/api/tasks", params={"project": project, "page": page,
                                                           "page_size": PAGE_SIZE, "fields": "all"})
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            yield from tasks
            if len(tasks) < PAGE_SIZE:
                return
            page += 1

    def predictions(self, task: int) -> list[dict]:
        return self._call("GET", "/api/predictions", params={"task": task})

    def add_prediction(self, task: int, prediction: dict) -> None:
        self._call("POST", "/api/predictions", json={"task": task, **prediction})

    def import_tasks(self, project: int, tasks: list[dict]) -> None:
        self._call("POST", f"/api/projects/{project}/import", json=tasks)


def push_label_studio(output: str, url: str, project: int, token: str, *,
                      model: str | None = None, weights_sha256: str | None = None,
                      from_name: str = "tag", to_name: str = "image",
                      url_prefix: str | None = None) -> PushResult:
    """Attach OUTPUT's predictions to project `project`'s tasks (matched by data.image),
    creating tasks for images the project does not have. Streams OUTPUT; the project's
    task index (image reference -> task id) is the only thing held in memory."""
    meta = select_identity(output, model=model, weights_sha256=weights_sha256)
    client = LabelStudioClient(url, token)
    client.project(project)  # fails early with a clear message for a wrong id or token
    # image reference -> (task id, model versions already predicted on it)
    by_image = {t["data"].get("image"): (t["id"], {p.get("model_version") for p in
                                                   t.get("predictions") or [] if isinstance(p, dict)})
                for t in client.tasks(project) if isinstance(t.get("data"), dict)}
    attached = created = already = 0
    pending: list[dict] = []
    for row in iter_mask_rows(output, meta):
        task = label_studio_task(row, meta, from_name=from_name, to_name=to_name,
                                 url_prefix=url_prefix)
        task_id, versions = by_image.get(task["data"]["image"], (None, set()))
        if task_id is not None:
            prediction = task["predictions"][0]
            if prediction["model_version"] in versions:  # pushed before: not twice
                already += 1
                continue
            client.add_prediction(task_id, prediction)
            attached += 1
            continue
        pending.append(task)
        if len(pending) >= IMPORT_BATCH:
            client.import_tasks(project, pending)
            created += len(pending)
            pending = []
    if pending:
        client.import_tasks(project, pending)
        created += len(pending)
    return PushResult(project, attached, created, already, count_errors(output, meta))
