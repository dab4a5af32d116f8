import json, time, urllib.request, threading
def post(p, path, body):
    req=urllib.request.Request(f"http://127.0.0.1:{p}{path}", data=json.dumps(body).encode(), headers={"Content-Type":"application/json"})
    with urllib.request.urlopen(req, timeout=60) as r: return r.status, r.read()
for n in range(6):
    s, body = post(18081, "/deployments/clu/tasks/create", {"input": json.dumps({"message": "x", "wait_for_event": True, "report_process": True})})
    task = json.loads(body)["task_id"]
    lines=[]
    def stream():
        with urllib.request.urlopen(f"http://127.0.0.1:18082/deployments/clu/tasks/{task}/events?envelope=true", timeout=60) as r:
            for line in r:
                lines.append(json.loads(line))
    th=threading.Thread(target=stream); th.start()
    time.sleep(0.5)
    print(post(18080, f"/deployments/clu/tasks/{task}/events", {"event_obj_str": json.dumps({"__is_pydantic": True, "value": {"hello": n}, "qualified_name": "x.HumanResponseEvent"}), "agent_id": "svc"}))
    th.join(30)
    print([l.get("type") for l in lines], lines[-1])
