/*
 * Tuned CLIP search: the dataset browser's search panel of the clip-finetune app (dataloop.json, panel
 * "tuned-clip-search", slot datasetBrowserSearch; the toolbar "Tuned CLIP" opens it).
 *
 * The platform calls run(textInput, itemsQuery) with the panel's form ({"Text Box": ..., "Model": ...}) and the
 * browser's current query, and shows the items of the query it returns. Like Dataloop's own CLIP panel
 * (dataloop-ai-apps/clip-smart-search, entire.js) it returns a DQL join on feature_vectors sorted by $euclid
 * distance, nearest first; unlike it, the query vector comes from the fine-tuned model whose image vectors fill
 * the feature set: the app's clip-nodes service embeds the text (its embed_query function, run as an execution)
 * with the dataset's newest promoted model, or with the model whose id is typed in "Model".
 * Why a service call and not the model in the browser: docs/dataloop.md ("Search in the dataset browser").
 */
async function run(textInput, itemsQuery) {
    const SERVICE = "clip-nodes";
    const FUNCTION = "embed_query";
    const POLL_MS = 300;
    const SLOW_MS = 5000; // past this, tell the user the service is starting (a cold start takes minutes)
    const WAIT_MS = 10 * 60 * 1000; // the service's cold start: a pod and the model's weights
    const defaultFilter = { $and: [{ hidden: false }, { type: "file" }] };
    const filter = itemsQuery && itemsQuery.filter ? itemsQuery.filter : defaultFilter;
    const unchanged = { filter: filter, resource: "items" };

    function toast(message, type) {
        dl.sendEvent({ name: "app:toastMessage", payload: { message: message, type: type } });
    }
    function field(name) {
        const value = textInput && typeof textInput === "object" ? textInput[name] : undefined;
        return typeof value === "string" ? value.trim() : "";
    }
    function statusOf(execution) {
        const latest = execution.latestStatus || execution.latest_status || {};
        return latest.status || execution.status;
    }
    function sleep(ms) {
        return new Promise((resolve) => setTimeout(resolve, ms));
    }
    async function finished(execution) {
        const started = Date.now();
        let warned = false;
        while (!["success", "failed", "aborted", "terminated"].includes(statusOf(execution))) {
            if (Date.now() - started > WAIT_MS) {
                throw new Error("the clip-nodes service did not answer in 10 minutes; try again later");
            }
            if (!warned && Date.now() - started > SLOW_MS) {
                warned = true;
                toast("Tuned CLIP: the search service is starting (the first query after a quiet time takes a few minutes)", "warning");
            }
            await sleep(POLL_MS);
            execution = await dl.executions.get(execution.id);
        }
        return execution;
    }

    const text = field("Text Box");
    if (!text) {
        toast("Tuned CLIP: type what to look for", "error");
        return unchanged;
    }
    const dataset = await dl.datasets.get();
    let execution;
    try {
        execution = await dl.executions.create({
            functionName: FUNCTION,
            serviceName: SERVICE,
            input: { dataset: { dataset_id: dataset.id }, text: text, model_id: field("Model") },
        });
        execution = await finished(execution);
    } catch (e) {
        toast(`Tuned CLIP search failed: ${e && e.message ? e.message : e}`, "error");
        return unchanged;
    }
    if (statusOf(execution) !== "success") {
        const latest = execution.latestStatus || {};
        toast(`Tuned CLIP search failed: ${latest.message || statusOf(execution)}`, "error");
        return unchanged;
    }
    // the function's return value; parsed if the runtime hands it over as JSON text
    const found = typeof execution.output === "string" ? JSON.parse(execution.output) : execution.output;
    if (!found || !Array.isArray(found.vector) || !found.feature_set_id) {
        toast("Tuned CLIP search failed: the clip-nodes service answered no query vector (is the app up to date?)", "error");
        return unchanged;
    }
    const joined = {
        filter: filter,
        resource: "items",
        join: {
            on: { resource: "feature_vectors", local: "entityId", forigen: "id" }, // "forigen": sic, as DQL spells it
            filter: { featureSetId: found.feature_set_id },
        },
    };
    const [all, embedded] = await Promise.all([
        dl.items.countByQuery({ filter: filter, resource: "items" }),
        dl.items.countByQuery(joined),
    ]);
    if (all !== embedded) {
        toast(`Tuned CLIP: ${all - embedded} of ${all} items have no vector of model ${found.model_name} yet (new items are embedded as they arrive; run the pipeline's Embed dataset for the rest)`, "warning");
    }
    return {
        filter: filter,
        page: 0,
        pageSize: 1000,
        resource: "items",
        join: {
            on: { resource: "feature_vectors", local: "entityId", forigen: "id" },
            filter: {
                value: { $euclid: { input: Array.from(found.vector), $euclidSort: { eu_dist: "ascending" } } },
                featureSetId: found.feature_set_id,
                datasetId: dataset.id,
            },
        },
    };
}
