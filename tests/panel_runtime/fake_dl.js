/*
 * A fake of the `dl` object Dataloop's panel runtime hands a panel script, backed by the loopback platform over
 * HTTP. It offers the calls Dataloop's own CLIP panel makes (dataloop-ai-apps/clip-smart-search, entire.js:
 * dl.datasets.get(), dl.projects.get(), dl.items.getByName(name, opts), dl.items.countByQuery(query),
 * dl.executions.query({functionName, serviceName, projectId}), dl.executions.create({functionName, serviceName,
 * input}), dl.sendEvent({name, payload})), with the same arguments and results as entire.js reads them, plus
 * dl.executions.get(id), which entire.js does not show (docs/dataloop.md lists it as unverified).
 * The panel runs in the dataset browser: `datasets.get()` and `projects.get()` without an id are the browser's.
 * sendEvent records the events in window.dlEvents for the test to read.
 */
window.makeFakeDl = function (config) {
    const base = config.baseUrl; // http://127.0.0.1:<port>/api/v1
    const headers = { "Content-Type": "application/json", Authorization: `Bearer ${config.token}` };
    window.dlEvents = [];
    window.dlCalls = [];

    async function call(method, path, body) {
        window.dlCalls.push(`${method} ${path}`);
        const response = await fetch(base + path, {
            method: method, headers: headers, body: body === undefined ? undefined : JSON.stringify(body),
        });
        const json = await response.json();
        if (!response.ok) {
            throw new Error(`${method} ${path}: ${response.status} ${JSON.stringify(json)}`);
        }
        return json;
    }
    function serviceId(name) {
        const id = config.services[name];
        if (!id) throw new Error(`no service named ${name} in this project`);
        return id;
    }
    const datasetQuery = (query) => call("POST", `/datasets/${config.datasetId}/query`, query);

    return {
        datasets: { get: (id) => call("GET", `/datasets/${id || config.datasetId}`) },
        projects: { get: (id) => call("GET", `/projects/${id || config.projectId}`) },
        items: {
            countByQuery: async (query) => (await datasetQuery({ ...query, page: 0, pageSize: 0 })).totalItemsCount,
            getByName: async (name) => {
                const page = await datasetQuery({ filter: { filename: name }, resource: "items", page: 0, pageSize: 1 });
                if (!page.items.length) throw new Error(`item ${name} not found`);
                return page.items[0];
            },
        },
        executions: {
            create: ({ functionName, serviceName, input }) =>
                call("POST", `/executions/${serviceId(serviceName)}`, { functionName: functionName, input: input,
                                                                          projectId: config.projectId }),
            get: (id) => call("GET", `/executions/${id}`),
            query: async () => {
                throw new Error("executions.query: the loopback platform does not serve it (the panel does not use it)");
            },
        },
        sendEvent: (event) => window.dlEvents.push(event),
    };
};
