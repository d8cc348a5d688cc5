"""The use cases every face calls (cli/, api/, dataloop/): train, evaluate, embed, search, export. A face only
translates its arguments, progress and errors; what a use case does, and in what order, is said once here.

faces (cli, api, dataloop) -> app (these use cases) -> engine (training, retrieval, model, data) -> ground
"""
