"""Hub failures as one-line messages that say what to do (offline, unreachable, unauthorised, not found)."""

import contextlib
from collections.abc import Iterator

from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from linearpatch.common.errors import LinearPatchError


class HubUnavailableError(LinearPatchError):
    """The Hub could not be used for this request."""


def _is_network_error(error: BaseException) -> bool:
    root = type(error).__module__.split(".")[0]
    return root in ("httpx", "httpx2", "httpcore", "httpcore2") or isinstance(error, ConnectionError | TimeoutError)


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str) -> Iterator[None]:
    """Turn Hub and network exceptions raised inside the block into [`HubUnavailableError`]."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except OfflineModeIsEnabled as error:
        raise HubUnavailableError(
            f"Cannot {action} {repo_id}: offline mode is on (HF_HUB_OFFLINE=1). Unset it to reach {endpoint}."
        ) from error
    except LocalEntryNotFoundError as error:
        raise HubUnavailableError(
            f"Cannot {action} {repo_id}: it is not in the local HF cache and {endpoint} cannot be reached (offline?). "
            "Connect, or check HF_ENDPOINT."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = {
            401: "log in with `hf auth login` or set HF_TOKEN",
            403: "your token lacks write access to it",
            404: "check the repo id and that you can see it",
        }.get(status, "try again later")
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubUnavailableError(f"Cannot {action} {repo_id} (HTTP {status}: {first_line}); {hint}.") from error
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise HubUnavailableError(
            f"Cannot {action} {repo_id}: {endpoint} is unreachable ({type(error).__name__}). Check your network or "
            "HF_ENDPOINT; `linearpatch pull` also works offline from the HF cache."
        ) from error


__all__ = ["HubUnavailableError", "hub_errors"]
