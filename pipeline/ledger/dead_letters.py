"""Dead letters: the messages a worker or aggregator refused as malformed, one ledger row each
(table `dead_letters`), written by `pipeline.consumer` and counted by the aggregator's
`/metrics` (`pipeline_rejected_messages_total`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator
from sqlalchemy import Connection, Engine, create_engine, insert
from sqlalchemy.pool import NullPool

from pipeline.database import sqlalchemy_url
from pipeline.ledger import queries
from pipeline.schema import DeadLetter, RejectionReason

# Most characters of a message's body kept in its row; the rest is cut off.
BODY_CHARS = 4096
# Most characters kept of the other text columns (an attacker picks their length).
NAME_CHARS = 256
DETAIL_CHARS = 1024
# The consumer's event loop waits on this connect while it records a dead letter.
CONNECT_TIMEOUT_S = 3


def _storable(limit: int) -> AfterValidator:
    """Text PostgreSQL can store (no NUL character), cut to `limit` characters."""
    return AfterValidator(lambda value: value.replace("\x00", "\\x00")[:limit])


def _body_text(body: object) -> object:
    """A message body as text: bytes decoded as UTF-8 (undecodable bytes escaped), only as many
    as the row keeps."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body[: BODY_CHARS * 4]).decode("utf-8", errors="backslashreplace")
    return body


Name = Annotated[str, _storable(NAME_CHARS)]


class RejectedMessage(BaseModel):
    """What a dead-letter row holds of a refused message (every text bounded and storable)."""

    queue: Name
    message_id: Name | None
    task: Name | None
    reason: RejectionReason
    detail: Annotated[str, _storable(DETAIL_CHARS)]
    content_type: Name | None
    body: Annotated[str, BeforeValidator(_body_text), _storable(BODY_CHARS)]
    hostname: Name


REJECTED_BY_QUEUE_AND_REASON = queries.query("rejected_messages")


def make_engine(database_url: str) -> Engine:
    """An engine for a consumer's rare dead-letter writes: no pooled connection (nothing for a
    forked pool process to inherit) and a short connect timeout."""
    return create_engine(
        sqlalchemy_url(database_url), poolclass=NullPool, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
    )


def record(engine: Engine, message: RejectedMessage) -> None:
    """Insert one dead-letter row for `message`.

    Raises:
        SQLAlchemyError: the ledger is unreachable or refused the row.
    """
    with engine.begin() as conn:
        conn.execute(insert(DeadLetter).values(**message.model_dump()))


def rejected_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """The dead-letter rows by (queue, reason)."""
    return {(row.queue, row.reason): row.messages for row in conn.execute(REJECTED_BY_QUEUE_AND_REASON)}
