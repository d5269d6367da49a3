"""What is printed or logged never holds a password: `redact` on the URL forms the
pipeline's settings take (PostgreSQL, Redis, RabbitMQ, libpq's keywords) and in error text."""

from __future__ import annotations

import pytest

from pipeline.redaction import error_line, redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:pw@db:5432/pipeline", "postgresql://u:***@db:5432/pipeline"),
        ("postgresql+psycopg://u:pw@db/pipeline", "postgresql+psycopg://u:***@db/pipeline"),
        ("postgresql://u:p@ss:w/rd@db/pipeline", "postgresql://u:***@db/pipeline"),
        ("postgresql://u:p@ss@db/pipeline", "postgresql://u:***@db/pipeline"),
        ("postgresql://u:pw@db:abc/pipeline", "postgresql://u:***@db:abc/pipeline"),
        (
            "postgresql://u@db/pipeline?password=pw&sslmode=require",
            "postgresql://u@db/pipeline?password=***&sslmode=require",
        ),
        ("host=db user=u password=pw dbname=pipeline", "host=db user=u password=*** dbname=pipeline"),
        ("redis://:pw@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:pw@redis:6380/0", "rediss://default:***@redis:6380/0"),
        ("amqp://guest:pw@rabbitmq:5672/vhost", "amqp://guest:***@rabbitmq:5672/vhost"),
        ("amqp://a:pw1@h1//;amqp://b:pw2@h2//", "amqp://a:***@h1//;amqp://b:***@h2//"),
        ("cannot reach 'redis://:pw@r:6379/0': refused", "cannot reach 'redis://:***@r:6379/0': refused"),
        # Nothing to hide: left as it is.
        ("postgresql://u@db:5432/pipeline", "postgresql://u@db:5432/pipeline"),
        ("http://127.0.0.1:5555/ (user admin)", "http://127.0.0.1:5555/ (user admin)"),
        ("postgresql://u@/pipeline?host=/tmp/pg", "postgresql://u@/pipeline?host=/tmp/pg"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redacted_url_keeps_no_trace_of_the_password() -> None:
    """A password with an unescaped `@`, `:`, `/`, `?` or `#` is masked whole, not cut short."""
    for password in ("s3cr@t", "a:b@c", "p/w@x?y#z", "x" * 64):
        assert password not in redact(f"postgresql://user:{password}@db.internal:5432/pipeline")


def test_error_line_is_the_first_line_redacted() -> None:
    error = ValueError("bad URL postgresql://u:pw@db/x\nsecond line")
    assert error_line(error) == "bad URL postgresql://u:***@db/x"
    assert error_line(ValueError()) == "ValueError"
