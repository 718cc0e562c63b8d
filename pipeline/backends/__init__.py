"""The API clients. Each composes one `http.ApiClient` (session, proxies, key, scrubbing,
error mapping, answers): `roboflow` (``/synthetic-image``), `openai` (the Images API),
`openai_batch` (the Batch API behind the online interface, with `batch_lines`,
`batch_files` and `batch_results`), `roboflow_search` and `roboflow_upload`; their own
calls retry under the run's policy through `retried`. `base` holds the `Backend` and
`BatchControl` protocols and the parsing they share (`inline`: base64 in answers), and
`embedded` the ``mock`` kind: a client against the embedded mock API (`pipeline.mockapi`).
"""
