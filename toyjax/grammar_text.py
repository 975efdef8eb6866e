"""Reading the BNF-like text form of a grammar into rules (toyjax.grammar compiles them into tables).

The reader desugars ( ) groups and postfix * + ? into helper rules, so the compiler only sees alternatives of
plain sequences; see toyjax/grammar.py for the language itself.
"""

from __future__ import annotations

import re


class GrammarError(ValueError):
    """A grammar that cannot be compiled, or data that the grammar does not accept."""


_LEXEME = re.compile(r"""
    (?P<space>[ \t\r\n]+) | (?P<comment>\#[^\n]*) | (?P<define>:=) | (?P<op>[|()*+?]) | (?P<empty>ε)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*') | (?P<regex>/(?:[^/\\\n]|\\.)+/)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)""", re.VERBOSE)


def _lex(text: str) -> list[tuple[str, str, int]]:
    lexemes, pos, line = [], 0, 1
    while pos < len(text):
        m = _LEXEME.match(text, pos)
        if not m:
            raise GrammarError(f"grammar line {line}: cannot read {text[pos:pos + 20]!r}")
        if m.lastgroup not in ("space", "comment"):
            lexemes.append((m.lastgroup, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return lexemes


class GrammarReader:
    """Recursive-descent reader of the text form; also desugars groups and * + ? into helper rules."""

    def __init__(self, text: str):
        self.lex = _lex(text) + [("end", "", -1)]
        self.i = 0
        self.rules: dict[str, list[list[tuple]]] = {}  # name -> alternatives -> symbols ("T", key) | ("N", name)
        self.line: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # helper rule -> the user rule it was written in
        self.refs: list[tuple[str, int]] = []

    def peek(self, k=0):
        return self.lex[self.i + k]

    def take(self, kind, what):
        lexeme = self.peek()
        if lexeme[0] != kind:
            found = lexeme[1] or "the end of the grammar"
            raise GrammarError(f"grammar line {lexeme[2]}: expected {what}, found {found!r}")
        self.i += 1
        return lexeme

    def read(self) -> str:
        start = None
        while self.peek()[0] != "end":
            _, name, line = self.take("name", "a rule name")
            self.take("define", f"':=' after rule name {name!r}")
            if name in self.rules:
                raise GrammarError(f"grammar line {line}: rule {name!r} is defined twice (first on line "
                                   f"{self.line[name]}); join the alternatives with '|'")
            self.line[name], self.owner[name] = line, name
            self.rules[name] = self.alternatives(name)
            start = start or name
        if start is None:
            raise GrammarError("the grammar has no rules; write e.g. program := \"calc\" expr \";\"")
        return start

    def alternatives(self, rule):
        alts = [self.sequence(rule)]
        while self.peek()[1] == "|":
            self.i += 1
            alts.append(self.sequence(rule))
        return alts

    def sequence(self, rule):
        symbols = []
        while True:
            kind, value, line = self.peek()
            if kind == "name" and self.peek(1)[0] == "define" or kind == "end" or value in ("|", ")"):
                return symbols
            self.i += 1
            if kind == "empty" or value in ('""', "''"):
                continue
            if kind == "string":
                item = [("T", ("lit", re.sub(r"\\(.)", r"\1", value[1:-1])))]
            elif kind == "regex":
                item = [("T", ("re", value[1:-1]))]
            elif kind == "name":
                item = [("N", value)]
                self.refs.append((value, line))
            elif value == "(":
                alts = self.alternatives(rule)
                if self.peek()[1] != ")":
                    raise GrammarError(f"grammar line {line}: '(' in rule {rule!r} is never closed with ')'")
                self.i += 1
                item = alts[0] if len(alts) == 1 else [("N", self.helper(rule, alts, line))]
            else:
                raise GrammarError(f"grammar line {line}: unexpected {value!r} in rule {rule!r}")
            while self.peek()[1] in ("*", "+", "?"):
                op = self.take("op", "an operator")[1]
                if op == "?":
                    item = [("N", self.helper(rule, [item, []], line))]
                else:
                    star = f"{rule}.{len(self.rules)}"
                    self.rules[star], self.line[star], self.owner[star] = [item + [("N", star)], []], line, rule
                    item = (item if op == "+" else []) + [("N", star)]
            symbols += item

    def helper(self, rule, alts, line):
        name = f"{rule}.{len(self.rules)}"  # the '.' keeps helper names apart from user names
        self.rules[name], self.line[name], self.owner[name] = alts, line, rule
        return name
