"""Labelling through the providers' batch APIs (Anthropic Message Batches, OpenAI Batch API).

- :mod:`.base`: what a provider's batch client must do, and the shapes it reports in;
- :mod:`.anthropic_batch`, :mod:`.openai_batch`: the two wire formats, through the official SDKs;
- :mod:`.table`: the batch state committed to the label store (or an eval suite's ledger file)
  before anything waits on a provider;
- :mod:`.engine`: chunking, submission under the cost cap, polling, resume, collection;
- :mod:`.labels`: autointerp labels through the engine; :mod:`.calls`: the eval suites'
  requests through it, from the one request loop :mod:`spd_host.evals.llm.requests`;
- :mod:`.sdk_client`: the SDK client and error mapping both wire-format clients share.
"""
