"""Test helpers: wait for a condition instead of sleeping.

`eventually` polls a predicate until it returns something truthy and returns
that value, or raises AssertionError at the deadline (with the last value or
exception in the message). `aeventually` is the asyncio twin; its predicate may
be a plain function or return an awaitable.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _describe(predicate: object, message: str | None) -> str:
    if message:
        return message
    return getattr(predicate, "__qualname__", None) or repr(predicate)


def eventually(
    predicate: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    message: str | None = None,
) -> T:
    """Polls ``predicate`` until truthy; returns its value.

    Raises:
        AssertionError: If still falsy (or raising) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        error: BaseException | None = None
        value: T | None = None
        try:
            value = predicate()
        except Exception as exc:  # keep polling; report the last one
            error = exc
        if error is None and value:
            return value
        if time.monotonic() >= deadline:
            last = f"raised {error!r}" if error is not None else f"returned {value!r}"
            raise AssertionError(
                f"not true within {timeout} s: {_describe(predicate, message)} (last {last})"
            ) from error
        time.sleep(interval)


async def aeventually(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    message: str | None = None,
) -> T:
    """Async `eventually`: the predicate may be sync or async.

    Raises:
        AssertionError: If still falsy (or raising) after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        error: BaseException | None = None
        value: T | None = None
        try:
            result = predicate()
            if inspect.isawaitable(result):
                left = max(deadline - loop.time(), interval)
                async with asyncio.timeout(left):
                    result = await result
            value = result
        except Exception as exc:  # incl. TimeoutError from a slow predicate
            error = exc
        if error is None and value:
            return value
        if loop.time() >= deadline:
            last = f"raised {error!r}" if error is not None else f"returned {value!r}"
            raise AssertionError(
                f"not true within {timeout} s: {_describe(predicate, message)} (last {last})"
            ) from error
        await asyncio.sleep(interval)
