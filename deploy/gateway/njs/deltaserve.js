// Task key of a request, for the gateway's consistent hash (njs, nginx's JavaScript).
// 1. the X-Task header;
// 2. else the OpenAI `model` field of a JSON body: `task` or `base:task` (the base alone is no task);
// 3. else the request id, which spreads base-only and admin requests evenly over the replicas.

function taskFromModel(model, base) {
    if (typeof model !== 'string' || model === '' || model === base) {
        return '';
    }
    var colon = model.indexOf(':');
    return colon < 0 ? model : model.slice(colon + 1);
}

function modelField(r) {
    var body;
    try {
        body = r.requestText;
    } catch (e) {
        return '';
    }
    if (!body) {
        return '';
    }
    try {
        return JSON.parse(body).model;
    } catch (e) {
        return '';
    }
}

function taskKey(r) {
    var header = r.headersIn['X-Task'];
    if (header) {
        return header;
    }
    return taskFromModel(modelField(r), r.variables.deltaserve_base) || r.variables.request_id;
}

export default {taskKey, taskFromModel};
