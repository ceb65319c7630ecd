"""LLM-judged suites (intruder, detection, fuzzing): trials, the judge runner, the suites."""
