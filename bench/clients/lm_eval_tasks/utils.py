def process_gen(doc, results):
    reply = results[0] or ""
    return {"has_boxed": float("\\boxed{" in reply), "nonempty": float(bool(reply.strip()))}
