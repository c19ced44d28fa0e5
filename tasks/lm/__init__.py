"""The LM of a cycle: providers (`local` llama.cpp, `sim`, any `dspy.LM` model string),
the managed engine wrapper (retries, rate limits, usage), usage and pricing, output
schemas for OpenAI-compatible servers, and the journal that replays LM calls on resume.
"""
