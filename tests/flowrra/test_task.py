"""Task definitions: names, validation and the decorator."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

from flowrra import Flowrra
from flowrra.protocol import SlotKind
from flowrra.task import TaskSpec, default_task_name, importable_module_name, make_spec


def plain(x: int) -> int:
    return x * 2


async def coro(x: int) -> int:
    return x


def gen() -> Any:
    yield 1


async def agen() -> Any:
    yield 1


class Holder:
    @staticmethod
    def method() -> None:
        pass


def spec(fn: Callable[..., Any], **overrides: Any) -> TaskSpec:
    options: dict[str, Any] = {
        "name": None,
        "max_retries": 3,
        "retry_delay": 1.0,
        "priority": 0,
        "cpu_bound": False,
        "timeout": None,
    }
    options.update(overrides)
    return make_spec(fn, **options)


def fake_main(monkeypatch: pytest.MonkeyPatch, module_name: str = "__main__", **attrs: Any) -> None:
    """Install a fake ``__main__`` module (what ``python script.py`` would leave)."""
    module = types.ModuleType(module_name)
    module.__spec__ = None
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, module_name, module)


def _with_module(fn: Callable[..., Any], module: str) -> Callable[..., Any]:
    def copy(*args: Any) -> Any:
        return fn(*args)

    copy.__module__ = module
    copy.__qualname__ = fn.__qualname__
    return copy


# --------------------------------------------------------------------------- names


def test_importable_module_name_leaves_normal_modules_alone() -> None:
    assert importable_module_name("pkg.mod") == "pkg.mod"
    assert importable_module_name(__name__) == __name__


def test_default_task_name_is_module_and_qualname() -> None:
    assert default_task_name(plain) == f"{__name__}.plain"
    assert default_task_name(Holder.method) == f"{__name__}.Holder.method"


@pytest.mark.parametrize("main", ["__main__", "__mp_main__"])
def test_script_main_uses_the_file_name(monkeypatch: pytest.MonkeyPatch, main: str) -> None:
    fake_main(monkeypatch, main, __file__="/some/dir/my_script.py")
    assert importable_module_name(main) == "my_script"
    assert default_task_name(_with_module(plain, main)) == "my_script.plain"


def test_main_run_with_dash_m_uses_the_spec_name(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch, __file__="/x/pkg/mod.py")
    sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="pkg.mod")
    assert importable_module_name("__main__") == "pkg.mod"


def test_package_main_drops_the_main_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch, __file__="/x/pkg/__main__.py")
    sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="pkg.__main__")
    assert importable_module_name("__main__") == "pkg"


def test_main_spec_named_main_falls_back_to_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch, __file__="tool.py")
    sys.modules["__main__"].__spec__ = types.SimpleNamespace(name="__main__")
    assert importable_module_name("__main__") == "tool"


def test_main_without_file_stays_main(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_main(monkeypatch)  # an interactive session: no __spec__, no __file__
    assert importable_module_name("__main__") == "__main__"


def test_missing_main_module_stays_main(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "__mp_main__", raising=False)
    assert importable_module_name("__mp_main__") == "__mp_main__"


# --------------------------------------------------------------------------- make_spec


def test_make_spec_defaults() -> None:
    s = spec(plain)
    assert s.name == f"{__name__}.plain"
    assert s.fn is plain
    assert (s.max_retries, s.retry_delay, s.priority, s.timeout) == (3, 1.0, 0, None)
    assert s.is_async is False and s.cpu_bound is False
    assert s.kind is SlotKind.ASYNC
    assert s.module == __name__ and s.qualname == "plain"


def test_make_spec_options() -> None:
    s = spec(plain, name="custom", max_retries=0, retry_delay=0, priority=-3, timeout=2)
    assert s.name == "custom"
    assert (s.max_retries, s.retry_delay, s.priority, s.timeout) == (0, 0.0, -3, 2.0)
    assert isinstance(s.retry_delay, float) and isinstance(s.timeout, float)


def test_make_spec_async_and_cpu() -> None:
    assert spec(coro).is_async is True
    assert spec(coro).kind is SlotKind.ASYNC
    cpu = spec(plain, cpu_bound=True)
    assert cpu.cpu_bound is True and cpu.kind is SlotKind.CPU


def test_async_cpu_bound_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="cpu_bound"):
        spec(coro, cpu_bound=True)


def test_nested_cpu_bound_is_a_type_error() -> None:
    def inner() -> None:
        pass

    with pytest.raises(TypeError, match="inside another function"):
        spec(inner, cpu_bound=True)
    assert spec(inner).name.endswith("<locals>.inner")  # fine when not cpu_bound


@pytest.mark.parametrize("fn", [gen, agen])
def test_generators_are_a_type_error(fn: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match="generator"):
        spec(fn)


def test_non_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        spec(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, 1.0, True, "3", None])
def test_bad_max_retries_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="max_retries"):
        spec(plain, max_retries=value)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "1", None, True])
def test_bad_retry_delay_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="retry_delay"):
        spec(plain, retry_delay=value)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "5", False])
def test_bad_timeout_is_a_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        spec(plain, timeout=value)


@pytest.mark.parametrize("value", [1.5, "high", True, None])
def test_bad_priority_is_a_type_error(value: Any) -> None:
    # None is not a priority for a task definition: it would be submitted as is and the
    # broker refuses a SUBMIT item whose priority is not an int.
    with pytest.raises(TypeError, match="priority"):
        spec(plain, priority=value)


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1, 10**20])
def test_priority_must_fit_in_32_bits(value: int) -> None:
    with pytest.raises(ValueError, match="priority"):
        spec(plain, priority=value)


def test_priority_bounds_are_accepted() -> None:
    assert spec(plain, priority=2**31 - 1).priority == 2**31 - 1
    assert spec(plain, priority=-(2**31)).priority == -(2**31)


@pytest.mark.parametrize("value", ["", 5, b"name"])
def test_bad_name_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="name"):
        spec(plain, name=value)


# --------------------------------------------------------------------------- decorator


def test_decorator_returns_the_function_unchanged() -> None:
    app = Flowrra()

    def add(a: int, b: int = 1) -> int:
        return a + b

    decorated = app.task(max_retries=1, priority=5)(add)
    assert decorated is add
    assert add(2, b=3) == 5  # still callable directly
    registered = app.spec_for(add)
    assert registered.fn is add
    assert registered.priority == 5 and registered.max_retries == 1
    assert app.tasks[registered.name] is registered
    assert app.spec_for(registered.name) is registered


async def test_decorated_coroutine_still_awaitable_directly() -> None:
    app = Flowrra()
    assert app.task()(coro) is coro
    assert await coro(7) == 7


def test_decorator_validates_at_decoration_time() -> None:
    app = Flowrra()
    with pytest.raises(TypeError):
        app.task(cpu_bound=True)(coro)
    assert not app.tasks


def test_two_functions_cannot_share_a_name() -> None:
    app = Flowrra()
    app.task(name="same")(plain)
    app.task(name="same")(plain)  # the same function again is fine
    with pytest.raises(ValueError, match="same"):
        app.task(name="same")(Holder.method)


@pytest.mark.parametrize(
    "options",
    [
        {"broker": "localhost:5555"},
        {"durability": "sometimes"},
        {"concurrency": 0},
        {"processes": -1},
        {"connect_timeout": 0},
        {"request_timeout": "soon"},
        {"curve_server_key": "server.key"},
    ],
)
def test_bad_app_options_fail_at_construction(options: dict[str, Any]) -> None:
    from flowrra import Flowrra

    with pytest.raises(ValueError):
        Flowrra(**options)
