"""An optional worked episode for the AppWorld prompt (``demonstration=True``; off by default).

LOOP and AppWorld's own ReAct agents show the model one solved episode before its task: a short
thought, one code cell, the cell's output, again, until ``complete_task``. This one is ours,
written for eprl's protocol (one fenced Python block per turn, ``apis.<app>.<api>``, outputs cut
to the budget): it reads the docs, logs in with the supervisor's password, pages through a list
API and answers a question. Its task is not one of the dataset's, its outputs come from an
imagined world (shortened, as the prompt says), and every cell's code runs unchanged against the
real engine (``tests/test_envs_appworld.py`` runs them), so the example never teaches a call
that fails.
"""

from __future__ import annotations

TASK = "How many of my notes in the Simple Note app are pinned?"

# (thought, code, output) per turn; the outputs are an imagined world's, shortened
TURNS: tuple[tuple[str, str, str], ...] = (
    (
        "I first look up which APIs the simple_note app offers.",
        "print(apis.api_docs.show_api_descriptions(app_name='simple_note'))",
        "[{'name': 'login', 'description': 'Login to your account.'}, ...,\n"
        " {'name': 'search_notes', 'description': 'Search your notes. ...'},\n"
        " {'name': 'show_note', 'description': 'Show detailed information of a note, ...'}, ...]",
    ),
    (
        "search_notes looks right. I check its parameters before calling it.",
        "print(apis.api_docs.show_api_doc(app_name='simple_note', api_name='search_notes'))",
        "{'api_name': 'search_notes', 'parameters': [{'name': 'access_token', 'required': True, ...},\n"
        " {'name': 'pinned', 'type': 'boolean', 'required': False, ...}, {'name': 'page_index', ...},\n"
        " {'name': 'page_limit', 'constraints': ['value >= 1.0, <= 20.0'], ...}, ...], ...}",
    ),
    (
        "It needs an access token: I log in with the supervisor's email and simple_note password.",
        "passwords = {a['account_name']: a['password'] for a in apis.supervisor.show_account_passwords()}\n"
        "email = apis.supervisor.show_profile()['email']\n"
        "token = apis.simple_note.login(username=email, password=passwords['simple_note'])['access_token']\n"
        "print('logged in')",
        "logged in",
    ),
    (
        "Results come one page at a time, so I collect every page of pinned notes.",
        "pinned, page = [], 0\n"
        "while True:\n"
        "    notes = apis.simple_note.search_notes(access_token=token, pinned=True, page_index=page, page_limit=20)\n"
        "    if not notes:\n"
        "        break\n"
        "    pinned += notes\n"
        "    page += 1\n"
        "print(len(pinned), [note['title'] for note in pinned])",
        "3 ['Packing List', 'Book Ideas', 'Workout Plan']",
    ),
    (
        "Three notes are pinned. The task asks a question, so I pass only the answer.",
        "apis.supervisor.complete_task(answer=3)",
        "",
    ),
)


def cells() -> list[str]:
    """The demonstration's code cells, in order (the last one ends its episode)."""
    return [code for _, code, _ in TURNS]


def render() -> str:
    """The demonstration as the prompt shows it, between the rules and the real task."""
    lines = [
        "Example of a finished episode (a different task in a different world, shown only for the",
        "format; its outputs are shortened):",
        "",
        f"Example task: {TASK}",
    ]
    for number, (thought, code, output) in enumerate(TURNS, 1):
        lines += ["", f"Turn {number}:", thought, "```python", code, "```"]
        if output:
            lines += ["Output:", output]
    lines += ["", "End of the example. Your own task follows.", ""]
    return "\n".join(lines)
