"""Chat templates: the model's Jinja template (config.json) rendered in a sandbox, bounded in time and size."""
import datetime
import json
import sys
import time

from .errors import FormatError, is_int

# A template formats a few messages in milliseconds; bounds far above that: time for Python-level work, size for the
# one-step C operations that could take minutes (`*` of a sequence, `**` of an int; the sandbox caps range() itself).
# Memory is not bounded: center(10**8) allocates what it asks for (a bound would need a child under RLIMIT_AS).
CHAT_TEMPLATE_SECONDS = 1.0
CHAT_TEMPLATE_MAX_LEN = 10 ** 6  # longest string, list or tuple `*` may build
CHAT_TEMPLATE_MAX_BITS = 10 ** 5  # largest int `**` may build


def bounded_binop(context, operator, left, right):
    """left * right or left ** right in a template (jinja's call_binop hook), an OverflowError past the limits above."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and is_int(n) and len(seq) * n > CHAT_TEMPLATE_MAX_LEN:
                raise OverflowError(f"'*' would repeat a sequence of {len(seq)} items {n} times "
                                    f"(at most {CHAT_TEMPLATE_MAX_LEN} items)")
    if is_int(left) and is_int(right) and abs(left) > 1:
        # a * b has ~bits(a) + bits(b) bits, a ** b ~b * bits(a) (squaring in a loop: one multiplication of minutes)
        bits = int(abs(left)).bit_length()
        if (bits + int(abs(right)).bit_length() if operator == "*" else right * bits) > CHAT_TEMPLATE_MAX_BITS:
            raise OverflowError(f"'{operator}' would build an integer of more than {CHAT_TEMPLATE_MAX_BITS} bits")
    return left * right if operator == "*" else left ** right


def render_chat_template(template, **variables):
    """The template rendered with `variables` and transformers' helpers ({% break %}/{% continue %}, raise_exception,
    strftime_now, a tojson keeping non-ASCII and HTML as is; not {% generation %}). Untrusted: sandboxed as transformers
    does, bounded as above; any exception is a one-line FormatError naming config.json's chat_template."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):  # the template's own refusal
        raise jinja2.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    env.intercepted_binops = frozenset({"*", "**"})  # also keeps them out of compile-time constant folding
    env.call_binop = bounded_binop
    deadline = time.perf_counter() + CHAT_TEMPLATE_SECONDS

    def trace(frame, event, arg):  # sys.settrace's hook: each Python line the rendering runs checks the clock
        if time.perf_counter() > deadline:
            raise TimeoutError(f"rendering ran past {CHAT_TEMPLATE_SECONDS:g} s")
        return trace
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        try:
            return env.from_string(template).render(**variables)
        finally:
            sys.settrace(previous)
    except Exception as e:  # whatever the template does wrong (any exception), the model file is at fault
        first = (str(e).splitlines() or [""])[0][:200]
        raise FormatError(f"config.json: chat_template: {type(e).__name__}: {first}") from None
