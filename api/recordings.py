"""Recordings (n-tuple PCAP recorder): HTTP only; recorder/manager.py does the work.

    POST   /v1/recordings                    start -> 201 recording
    GET    /v1/recordings                    {"recordings": [...]}, live counts
    GET    /v1/recordings/{id}               one recording
    POST   /v1/recordings/{id}/stop          stop -> recording
    GET    /v1/recordings/{id}/files/{index} the capture file
    DELETE /v1/recordings/{id}               stop and remove its files -> 204

Filters are ``"SRC SPORT DST DPORT PROTO"`` strings (``any any any 80 tcp`` with both
addresses wildcards means IPv4 and IPv6) or objects as ``Filter.from_dict`` accepts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from l4lb.issues import Conflict, ControlError, Invalid, Issue, NotFound
from l4lb.recfilter import Filter, expand_filter
from l4lb.recorder.limits import RotationPolicy, StopConditions
from l4lb.recorder.recording import MAX_CAPTURE_LENGTH, RecordingSpec

from .errors import responses
from .jsonroute import StrictJSONRoute

router = APIRouter(tags=["recordings"], route_class=StrictJSONRoute)

MEDIA = {"pcapng": "application/x-pcapng", "pcap": "application/vnd.tcpdump.pcap"}
RecId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Recording id")]


class Unavailable(ControlError):
    status, slug, title = 503, "recorder-unavailable", "Recorder not available"


class InsufficientStorage(ControlError):
    status, slug, title = 507, "insufficient-storage", "No room for a recording"


class Damaged(ControlError):
    status, slug, title = 409, "recording-damaged", "Recording file not servable"


class StopBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    packets: int | None = Field(None, ge=1, description="stop after this many packets")
    bytes: int | None = Field(None, ge=1, description="stop before the captured bytes exceed this")
    duration: float | None = Field(None, gt=0, le=86400 * 365, description="seconds")


class RotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int | None = Field(None, ge=1, description="new file once the current one exceeds this many bytes (-C)")
    seconds: float | None = Field(None, gt=0, le=86400 * 365, description="new file every this many seconds (-G)")
    count: int | None = Field(None, ge=1, le=100000, description="files: a ring with size, else stop (-W)")


class RecordingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filters: list[str | dict[str, Any]] = Field(min_length=1, max_length=16384)
    capture_length: int = Field(0, ge=0, le=MAX_CAPTURE_LENGTH, description="bytes per packet, 0 = whole")
    format: Literal["pcapng", "pcap"] = "pcapng"
    direction: Literal["in", "out", "both"] = Field(
        "both", description="which copies to keep: in (as the packet arrived), out (as the LB sent it: "
                            "encapsulated, or a reply it generated), both")
    verdict: bool = Field(True, description="pcapng: the XDP verdict as an epb_verdict option; false: in the "
                                            "comment only (Wireshark 4.0's editcap/mergecap/tshark -w corrupt the "
                                            "option)")
    stop: StopBody = StopBody()
    rotate: RotateBody = RotateBody()
    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_. -]*$")


def _manager(request: Request) -> Any:
    mgr = getattr(request.app.state, "recorder", None)
    if mgr is None:
        raise Unavailable("the recorder is not running in this daemon")
    return mgr


def _spec(body: RecordingBody) -> RecordingSpec:
    issues: list[Issue] = []
    filters: list[Filter] = []
    for i, item in enumerate(body.filters):
        try:
            new = expand_filter(item) if isinstance(item, str) else (Filter.from_dict(item),)
        except ValueError as e:
            issues.append(Issue(("body", "filters", i), str(e), "filter"))
            continue
        filters.extend(f for f in new if f not in filters)
    stop = rotation = None
    try:
        stop = StopConditions(
            max_packets=body.stop.packets, max_bytes=body.stop.bytes,
            max_duration_ns=round(body.stop.duration * 1e9) if body.stop.duration else None)
    except ValueError as e:
        issues.append(Issue(("body", "stop"), str(e), "stop"))
    try:
        rotation = RotationPolicy(
            file_size=body.rotate.size, rotate_ns=round(body.rotate.seconds * 1e9) if body.rotate.seconds else None,
            max_files=body.rotate.count)
    except ValueError as e:
        issues.append(Issue(("body", "rotate"), str(e), "rotate"))
    if issues:
        raise Invalid("; ".join(f"{'.'.join(map(str, i.loc))}: {i.msg}" for i in issues), issues)
    assert stop is not None and rotation is not None
    return RecordingSpec(filters=tuple(filters), capture_length=body.capture_length, fmt=body.format,
                         stop=stop, rotation=rotation, name=body.name, direction=body.direction,
                         verdict=body.verdict)


def _get(mgr: Any, rid: str) -> Any:
    from l4lb.recorder.manager import NoSuchRecording

    try:
        return mgr.get(rid)
    except NoSuchRecording:
        raise NotFound(f"no recording {rid!r}") from None


@router.post("/v1/recordings", status_code=201, responses=responses(409, 422, 507))
def start_recording(body: RecordingBody, request: Request) -> dict[str, Any]:
    from l4lb.recorder.manager import FilterLimit, NoRoom, RecorderBusy, TooBig

    mgr = _manager(request)
    spec = _spec(body)
    try:
        rec = mgr.start(spec)
    except FilterLimit as e:
        raise Invalid(str(e), [Issue(("body", "filters"), str(e), "mask_limit")]) from None
    except TooBig as e:
        raise Invalid(str(e), [Issue(("body",), str(e), "disk_limit")]) from None
    except RecorderBusy as e:
        raise Conflict(str(e)) from None
    except NoRoom as e:
        raise InsufficientStorage(str(e)) from None
    return rec.to_dict()


@router.get("/v1/recordings")
def list_recordings(request: Request) -> dict[str, Any]:
    return {"recordings": [r.to_dict() for r in _manager(request).list()]}


@router.get("/v1/recordings/{rid}", responses=responses(404))
def get_recording(rid: RecId, request: Request) -> dict[str, Any]:
    return _get(_manager(request), rid).to_dict()


@router.post("/v1/recordings/{rid}/stop", responses=responses(404))
def stop_recording(rid: RecId, request: Request) -> dict[str, Any]:
    mgr = _manager(request)
    _get(mgr, rid)
    return mgr.stop(rid).to_dict()


@router.delete("/v1/recordings/{rid}", status_code=204, responses=responses(404))
def delete_recording(rid: RecId, request: Request) -> Response:
    mgr = _manager(request)
    _get(mgr, rid)
    mgr.delete(rid)
    return Response(status_code=204)


@router.get("/v1/recordings/{rid}/files/{index}", responses=responses(404, 409))
def download_file(rid: RecId, index: Annotated[int, PathParam(ge=0)], request: Request) -> StreamingResponse:
    from l4lb.recorder.manager import Damaged as DamagedFile, NoSuchFile

    mgr = _manager(request)
    _get(mgr, rid)
    try:
        path, fmt = mgr.file_path(rid, index)
    except NoSuchFile:
        raise NotFound(f"recording {rid!r} has no file {index}") from None
    except DamagedFile as e:
        raise Damaged(str(e)) from None
    try:  # no symlink, no FIFO (O_NONBLOCK), nothing but a regular file, even if it changed just now
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        raise Damaged(f"file {index} of recording {rid} cannot be opened; it is not served") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Damaged(f"file {index} of recording {rid} is not a regular file; it is not served")
    size = st.st_size   # a running recording's file grows: send what is there now

    def body() -> Iterator[bytes]:
        with os.fdopen(fd, "rb") as f:
            left = size
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    return StreamingResponse(body(), media_type=MEDIA[fmt], headers={
        "Content-Length": str(size),
        "Content-Disposition": f'attachment; filename="{path.name}"',
    })
