// thingsd web console: one page with hash routes over the REST API (/api/v1) and, for the
// system scope, the operators' API (/admin/v1). Every action is an API call made with the
// user's own token, so the console can do exactly what the user may do; errors are shown.
"use strict";

const view = document.getElementById("view");
const errorBox = document.getElementById("error");
let liveSocket = null;
let refreshTimer = null;

// ---- session -------------------------------------------------------------------------------
const session = {
  get access() { return localStorage.getItem("thingsd.access"); },
  get refresh() { return localStorage.getItem("thingsd.refresh"); },
  get me() { try { return JSON.parse(localStorage.getItem("thingsd.me") || "null"); } catch { return null; } },
  save(t) {
    localStorage.setItem("thingsd.access", t.access_token);
    localStorage.setItem("thingsd.refresh", t.refresh_token);
  },
  clear() { ["thingsd.access", "thingsd.refresh", "thingsd.me"].forEach((k) => localStorage.removeItem(k)); },
};

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function call(base, method, path, body, retried) {
  const headers = { "content-type": "application/json" };
  if (session.access) headers.authorization = "Bearer " + session.access;
  const r = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401 && !retried && session.refresh && !path.startsWith("/auth/")) {
    // The access token expired: exchange the refresh token once, then try again.
    const t = await fetch("/api/v1/auth/refresh", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ refresh_token: session.refresh }) });
    if (t.ok) { session.save(await t.json()); return call(base, method, path, body, true); }
    session.clear();
    location.hash = "#/login";
    throw new ApiError(401, "unauthorized", "your session has ended: log in again");
  }
  const text = await r.text();
  let data = text;
  try { data = JSON.parse(text); } catch { /* CSV and plain answers */ }
  if (!r.ok) {
    const e = data && data.error ? data.error : { code: String(r.status), message: r.statusText };
    throw new ApiError(r.status, e.code, e.message);
  }
  return data;
}
const api = (method, path, body) => call("/api/v1", method, path, body);
const ops = (method, path, body) => call("/admin/v1", method, path, body);

// ---- small DOM helpers ---------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  return el;
}
function showError(e) {
  errorBox.textContent = e instanceof Error ? e.message : String(e);
  errorBox.hidden = false;
}
function clearError() { errorBox.hidden = true; errorBox.textContent = ""; }
// What an empty list says instead of a blank strip: what it would hold and how to add some.
const EMPTY = {
  products: "No products yet. A product holds its devices' thing model: create one above.",
  groups: "No groups yet. Groups organise devices (a group may sit in another): create one above.",
  devices: "No devices yet. Create one above (its access token is shown once), or import many with POST /api/v1/devices/import.",
  commands: "No commands yet. Send one above: the device gets it now if connected, or when it next connects.",
  credentials: "No credentials: the device cannot log in. Add an access token or a username and password above.",
  "open-alerts": "No open alerts.",
  alerts: "No alerts raised yet.",
  rules: "No alert rules yet. A rule watches a device's (or a product's) telemetry: create one above.",
  channels: "No channels yet. Add a webhook or an e-mail channel above to be told of alerts.",
  users: "No users yet besides you.",
  roles: "No custom roles yet. The built-in roles are tenant_admin and tenant_user.",
  packages: "No firmware or software packages yet: upload one below.",
  ota: "No firmware or software announced to this device yet.",
};
function table(headers, rows, testid) {
  if (!rows.length) return h("p", { class: "empty", "data-testid": (testid || "list") + "-empty" }, EMPTY[testid] || "Nothing here yet.");
  return h("div", { class: "scroll" }, h("table", { "data-testid": testid }, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))));
}
function time(ms) { return ms ? new Date(ms).toLocaleString() : ""; }
function field(label, input) { return h("label", {}, label, input); }
// A form whose submit runs `fn(values)`, showing any error.
function form(testid, fields, submit, fn) {
  const f = h("form", { class: "inline", "data-testid": testid }, fields, h("button", { type: "submit" }, submit));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearError();
    const values = Object.fromEntries(new FormData(f).entries());
    try { await fn(values, f); } catch (e) { showError(e); }
  });
  return f;
}
function num(v) { return v === "" || v === undefined ? undefined : Number(v); }

// ---- pages ---------------------------------------------------------------------------------
async function loginPage() {
  document.getElementById("top").hidden = true;
  const f = form("login", [
    h("h1", {}, "thingsd"),
    field("Username", h("input", { name: "username", autocomplete: "username", required: true })),
    field("Password", h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
  ], "Log in", async (v) => {
    const t = await api("POST", "/auth/login", { username: v.username, password: v.password });
    session.save(t);
    localStorage.setItem("thingsd.me", JSON.stringify(await api("GET", "/auth/me")));
    location.hash = "#/";
  });
  f.className = "login";
  view.replaceChildren(f);
}

async function dashboard() {
  const me = session.me || {};
  const [sum, open] = await Promise.all([api("GET", "/summary"), api("GET", "/alerts?open=1&limit=100").catch(() => ({ items: [], total: 0 }))]);
  const card = (testid, value, label, cls) => h("div", { class: "card", "data-testid": testid }, h("b", { class: cls }, value), label);
  view.replaceChildren(h("h1", {}, "Dashboard"), h("div", { class: "cards" },
    card("devices-total", sum.devices.total, "devices"),
    card("devices-online", sum.devices.online, "online", "ok"),
    card("devices-offline", sum.devices.offline, "offline", sum.devices.offline ? "bad" : ""),
    card("products-total", sum.products, "products"),
    card("alerts-open", sum.open_alerts ?? "—", "open alerts", sum.open_alerts ? "bad" : "ok")));
  if (open.items.length) view.append(h("h2", {}, "Open alerts"), alertTable(open.items, false));
  if (me.tenant !== null) return;
  // System scope: per-node load, with message rates from two samples of the counters.
  const nodes = h("div");
  view.append(h("h2", {}, "Nodes"), nodes);
  let last = null;
  const sample = async () => {
    try {
      const [c, m] = await Promise.all([ops("GET", "/cluster"), ops("GET", "/metrics")]);
      const now = Date.now();
      const byNode = Object.fromEntries((m.nodes || []).map((n) => [n.node, n]));
      const rate = (n, k) => {
        const prev = last ? (last.byNode[n] || {})[k] : undefined;
        const cur = byNode[n] && byNode[n][k];
        return prev === undefined || cur === undefined ? "…" : ((cur - prev) / ((now - last.at) / 1000)).toFixed(1);
      };
      nodes.replaceChildren(table(["Node", "State", "Clients", "Msgs in/s", "Msgs out/s", "Queued", "Subscriptions", "Uptime (s)"],
        c.nodes.map((n) => { const x = byNode[n.node] || {}; return [n.node, n.state, x.clients_connected, rate(n.node, "messages_received"), rate(n.node, "messages_sent"), x.queued, x.subscriptions, x.uptime_secs]; }), "nodes"));
      last = { at: now, byNode };
    } catch (e) { showError(e); }
  };
  await sample();
  // Rates need two samples: the second comes a second later, then every 3 s.
  refreshTimer = setTimeout(async () => { await sample(); if (refreshTimer) refreshTimer = setInterval(sample, 3000); }, 1000);
}

async function productsPage() {
  const list = await api("GET", "/products?limit=200");
  const create = form("new-product", [
    field("Name", h("input", { name: "name", required: true })),
    field("Telemetry keys (key:unit, …)", h("input", { name: "keys", placeholder: "temp:°C, hum:%" })),
    field("Strict", h("select", { name: "strict" }, h("option", { value: "false" }, "no"), h("option", { value: "true" }, "yes"))),
  ], "Create product", async (v) => {
    const telemetry = (v.keys || "").split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
      const [key, unit] = s.split(":");
      return { key: key.trim(), type: "number", unit: unit ? unit.trim() : undefined };
    });
    await api("POST", "/products", { name: v.name, strict: v.strict === "true", model: { telemetry } });
    await productsPage();
  });
  view.replaceChildren(h("h1", {}, "Products"), create,
    table(["Id", "Name", "Strict", "Telemetry", "Created", ""], list.items.map((p) => [p.id, h("a", { href: "#/products/" + p.id }, p.name), p.strict ? "yes" : "no",
      p.model.telemetry.map((f) => f.key + (f.unit ? ` (${f.unit})` : "")).join(", "), time(p.created_ms),
      h("button", { type: "button", class: "secondary", onclick: async () => {
        if (!confirm(`Delete product ${p.name}? Its devices stay, without a product.`)) return;
        try { clearError(); await api("DELETE", "/products/" + p.id); await productsPage(); } catch (e) { showError(e); }
      } }, "Delete")]), "products"),
    h("h2", {}, "Device groups"), await groupsBlock());
}

async function groupsBlock() {
  const groups = await api("GET", "/groups?limit=500");
  const box = h("div");
  box.append(form("new-group", [
    field("Group name", h("input", { name: "name", required: true })),
    field("Parent", h("select", { name: "parent_id" }, h("option", { value: "" }, "—"), groups.items.map((g) => h("option", { value: g.id }, g.name)))),
  ], "Create group", async (v) => {
    await api("POST", "/groups", { name: v.name, parent_id: num(v.parent_id) });
    await productsPage();
  }), table(["Id", "Name", "Parent", "Devices"], groups.items.map((g) => [g.id, g.name, g.parent_id ?? "",
    h("a", { href: "#/devices?group=" + g.id }, "show")]), "groups"));
  return box;
}

async function devicesPage() {
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const search = q.get("q") || "";
  const product = q.get("product") || "";
  const group = q.get("group") || "";
  const [products, groups] = await Promise.all([api("GET", "/products?limit=200"), api("GET", "/groups?limit=500")]);
  const names = Object.fromEntries(products.items.map((p) => [p.id, p.name]));
  const listBox = h("div");
  const load = async () => {
    const list = await api("GET", "/devices?limit=200&sort=device_number" + (search ? "&q=" + encodeURIComponent(search) : "") + (product ? "&product_id=" + product : "") + (group ? "&group_id=" + group : ""));
    listBox.replaceChildren(h("p", {}, `${list.total} device(s)`),
      table(["Number", "Name", "Product", "Status", "Enabled", "Created"], list.items.map((d) => [
        h("a", { href: "#/devices/" + encodeURIComponent(d.device_number) }, d.device_number), d.name, names[d.product_id] || "",
        h("span", { class: d.online ? "ok" : "bad" }, d.online ? "online" : "offline"), d.enabled ? "yes" : "no", time(d.created_ms)]), "devices"));
  };
  const find = form("search", [
    field("Search", h("input", { name: "q", value: search, placeholder: "number or name" })),
    field("Product", h("select", { name: "product" }, h("option", { value: "" }, "all"), products.items.map((p) => h("option", { value: p.id, selected: String(p.id) === product }, p.name)))),
  ], "Search", async (v) => { location.hash = "#/devices?q=" + encodeURIComponent(v.q) + "&product=" + encodeURIComponent(v.product); });
  const created = h("div", { "data-testid": "created" });
  const create = form("new-device", [
    field("Device number", h("input", { name: "device_number", required: true, pattern: "[A-Za-z0-9_.:\\-]{1,128}" })),
    field("Name", h("input", { name: "name" })),
    field("Product", h("select", { name: "product_id" }, h("option", { value: "" }, "—"), products.items.map((p) => h("option", { value: p.id }, p.name)))),
    field("Group", h("select", { name: "group_id" }, h("option", { value: "" }, "—"), groups.items.map((g) => h("option", { value: g.id }, g.name)))),
  ], "Create device", async (v, f) => {
    const r = await api("POST", "/devices", { device_number: v.device_number, name: v.name || "", product_id: num(v.product_id), group_id: num(v.group_id) });
    created.replaceChildren("Access token of ", h("a", { href: "#/devices/" + encodeURIComponent(r.device.device_number) }, r.device.device_number),
      " (shown once): ", h("span", { class: "token", "data-testid": "token" }, r.access_token));
    f.reset();
    await load();
  });
  await load();
  view.replaceChildren(h("h1", {}, "Devices"), find, create, created, listBox);
}

// A time chart: series keyed by name, x in seconds.
function chart(container, title, seriesNames, data, xRange) {
  container.replaceChildren();
  const width = Math.max(280, Math.min(container.clientWidth || 900, 1100) - 16);
  const colors = ["#2f6fed", "#e8710a", "#188038", "#a142f4", "#d93025"];
  const x = xRange ? { time: true, range: () => xRange } : { time: true };
  return new uPlot({
    title, width, height: 260,
    series: [{}].concat(seriesNames.map((s, i) => ({ label: s, stroke: colors[i % colors.length], width: 2, points: { show: true } }))),
    scales: { x },
  }, data, container);
}

// The device page's groups, each its own tab (`#/devices/{number}/{tab}`).
const DEVICE_TABS = [["overview", "Overview"], ["telemetry", "Telemetry"], ["commands", "Commands"], ["attributes", "Attributes"],
  ["credentials", "Credentials"], ["firmware", "Firmware"]];

async function devicePage(number, tab) {
  tab = DEVICE_TABS.some(([t]) => t === tab) ? tab : "overview";
  const path = "/devices/" + encodeURIComponent(number);
  const [{ device, status }, creds, attrs, latest, commands, ota, packages] = await Promise.all([
    api("GET", path), api("GET", path + "/credentials"), api("GET", path + "/attributes"),
    api("GET", path + "/telemetry/latest"), api("GET", path + "/commands?limit=20"),
    api("GET", path + "/ota"), api("GET", "/ota/packages?limit=200").catch(() => ({ items: [] })),
  ]);
  const numericKeys = Object.entries(latest).filter(([, v]) => typeof (v && v.value !== undefined ? v.value : v) === "number").map(([k]) => k);
  const live = h("div", { class: "chart", id: "live", "data-testid": "live-chart", "data-points": "0" });
  const history = h("div", { class: "chart", id: "history", "data-testid": "history-chart" });
  const cmdList = h("div");
  const renderCommands = (list) => cmdList.replaceChildren(table(["Id", "Method", "Status", "Created", "Response"],
    list.map((c) => [c.id, c.method || c.kind, c.status, time(c.created_ms), c.response ? JSON.stringify(c.response) : ""]), "commands"));
  renderCommands(commands.items);
  const send = form("send-command", [
    field("Method", h("input", { name: "method", required: true })),
    field("Params (JSON)", h("input", { name: "params", value: "{}" })),
  ], "Send command", async (v) => {
    let params;
    try { params = JSON.parse(v.params || "{}"); } catch { throw new Error("params must be JSON"); }
    await api("POST", path + "/commands", { method: v.method, params });
    renderCommands((await api("GET", path + "/commands?limit=20")).items);
  });
  const histForm = form("history-form", [
    field("Key", h("select", { name: "key" }, numericKeys.map((k) => h("option", { value: k }, k)))),
    field("Range", h("select", { name: "range" }, [["1h", 3600], ["24h", 86400], ["7d", 604800], ["30d", 2592000]].map(([l, s]) => h("option", { value: s }, l)))),
    field("Aggregate", h("select", { name: "fn" }, ["avg", "min", "max", "sum", "count"].map((f) => h("option", { value: f }, f)))),
    field("Window", h("select", { name: "window" }, ["1m", "15m", "1h", "1d"].map((w) => h("option", { value: w, selected: w === "15m" }, w)))),
  ], "Show", async (v) => {
    if (!v.key) throw new Error("no numeric telemetry yet");
    const to = Date.now(), from = to - Number(v.range) * 1000;
    const r = await api("GET", `${path}/telemetry/aggregate?key=${encodeURIComponent(v.key)}&from=${from}&to=${to}&window=${v.window}&fn=${v.fn}`);
    const xs = r.buckets.map((b) => b.start / 1000), ys = r.buckets.map((b) => b.value);
    chart(history, `${v.key} (${v.fn} per ${v.window})`, [v.key], [xs, ys], [from / 1000, to / 1000]);
  });
  const latestRows = Object.entries(latest).map(([k, v]) => [k, JSON.stringify(v && v.value !== undefined ? v.value : v), time(v && v.ts)]);
  const sections = {
    overview: [
      h("p", { "data-testid": "status" }, "Status: ", h("b", { class: status.online ? "ok" : "bad" }, status.online ? "online" : "offline"),
      status.last_seen ? ` — last seen ${time(status.last_seen)}` : "", device.enabled ? "" : " — disabled"),
    h("p", {},
      h("button", { type: "button", class: "secondary", "data-testid": "toggle-enabled", onclick: async () => {
        try { clearError(); await api("PATCH", path, { enabled: !device.enabled }); await devicePage(number, "overview"); } catch (e) { showError(e); }
      } }, device.enabled ? "Disable (disconnects it)" : "Enable"), " ",
      h("button", { type: "button", class: "secondary", onclick: async () => {
        if (!confirm(`Delete device ${number}? Its telemetry stays in the store.`)) return;
        try { clearError(); await api("DELETE", path); location.hash = "#/devices"; } catch (e) { showError(e); }
      } }, "Delete")),
      h("p", {}, "Product: ", device.product_id ?? "none", " · Group: ", device.group_id ?? "none", " · Created ", time(device.created_ms)),
      h("h2", {}, "Latest values"),
      latestRows.length ? table(["Key", "Value", "At"], latestRows, "latest")
        : h("p", { class: "empty", "data-testid": "latest-empty" }, "No telemetry yet. Devices publish to devices/telemetry (MQTT), POST /api/v1/{token}/telemetry (HTTP) or CoAP."),
    ],
    telemetry: [h("h2", {}, "Live telemetry"), live, h("h2", {}, "History"), histForm, history],
    commands: [h("h2", {}, "Commands"), send, cmdList],
    attributes: [
      h("h2", {}, "Attributes"), h("pre", { class: "card", "data-testid": "attributes" }, JSON.stringify(attrs, null, 2)),
      form("set-attributes", [field("Shared attributes (JSON)", h("input", { name: "values", value: "{}", size: 40 }))], "Set", async (v) => {
      let params;
      try { params = JSON.parse(v.values || "{}"); } catch { throw new Error("attributes must be a JSON object"); }
      await api("PUT", path + "/attributes", { params });
      await devicePage(number, "attributes");
    }),
    ],
    credentials: [
    form("add-password", [
      field("MQTT username", h("input", { name: "username", required: true })),
      field("Password", h("input", { name: "password", type: "password", required: true, minlength: 8 })),
    ], "Add username + password", async (v) => {
      await api("POST", path + "/credentials", { kind: "password", username: v.username, password: v.password });
      await devicePage(number, "credentials");
    }),
    form("add-token", [], "New access token", async () => {
      const r = await api("POST", path + "/credentials", { kind: "token" });
      view.querySelector("[data-testid=new-token]").replaceChildren("New token (shown once): ", h("span", { class: "token" }, r.access_token));
    }),
    h("div", { "data-testid": "new-token" }),
    h("h2", {}, "Credentials"), table(["Id", "Kind", "Identity", "Created", ""], creds.map((c) => [c.id, c.kind, c.kind === "token" ? "…" + c.label : c.label, time(c.created_ms),
      h("button", { type: "button", class: "secondary", "data-testid": "revoke-" + c.id, onclick: async () => {
        if (!confirm("Revoke this credential? Connections that used it are closed.")) return;
        try { clearError(); await api("DELETE", `${path}/credentials/${c.id}`); await devicePage(number, "credentials"); } catch (e) { showError(e); }
      } }, "Revoke")]), "credentials")],
    firmware: firmwareSection(path, number, ota, packages.items),
  };
  view.replaceChildren(
    h("h1", {}, device.name, " ", h("small", {}, device.device_number)),
    h("nav", { class: "tabs", "data-testid": "device-tabs" }, DEVICE_TABS.map(([t, label]) =>
      h("a", { href: `#/devices/${encodeURIComponent(number)}/${t}`, class: t === tab ? "active" : "", "data-testid": "tab-" + t }, label))),
    h("section", { "data-testid": "section-" + tab }, sections[tab]));
  if (tab === "overview" || tab === "telemetry") startLive(number, live);
  if (tab === "telemetry" && numericKeys.length) histForm.requestSubmit();
}

// The device's firmware and software: what is announced, what it runs, its progress; announce
// a package, or upload a new one.
function firmwareSection(path, number, ota, packages) {
  const rows = ["firmware", "software"].filter((k) => ota[k] && (ota[k].assigned || ota[k].state || ota[k].current.version)).map((k) => {
    const o = ota[k];
    return [k, o.assigned ? `${o.assigned.title} ${o.assigned.version}` : "—", o.current.version ? `${o.current.title} ${o.current.version}` : "—",
      h("b", { class: o.state === "FAILED" ? "bad" : o.state === "UPDATED" ? "ok" : "" }, o.state || "—"), time(o.state_ts)];
  });
  const announce = form("announce-package", [
    field("Package", h("select", { name: "package_id", required: true }, packages.map((p) =>
      h("option", { value: p.id }, `${p.kind} ${p.title} ${p.version} (${Math.ceil(p.size / 1024)} KiB)`)))),
  ], "Announce to this device", async (v) => {
    await api("POST", path + "/ota", { package_id: Number(v.package_id) });
    await devicePage(number, "firmware");
  });
  const upload = form("upload-package", [
    field("Kind", h("select", { name: "kind" }, h("option", { value: "firmware" }, "firmware"), h("option", { value: "software" }, "software"))),
    field("Title", h("input", { name: "title", required: true })),
    field("Version", h("input", { name: "version", required: true })),
    field("Image", h("input", { name: "file", type: "file", required: true })),
  ], "Upload", async (v) => {
    const q = `kind=${encodeURIComponent(v.kind)}&title=${encodeURIComponent(v.title)}&version=${encodeURIComponent(v.version)}`;
    const r = await fetch(`/api/v1/ota/packages?${q}`, { method: "POST", body: v.file, headers: { authorization: "Bearer " + session.access } });
    if (!r.ok) throw new Error(((await r.json().catch(() => ({}))).error || {}).message || `upload failed (${r.status})`);
    await devicePage(number, "firmware");
  });
  return [
    h("h2", {}, "Firmware and software"),
    h("p", {}, "A package announced here reaches the device as fw_* / sw_* shared attributes; ThingsBoard SDKs then download it in chunks and report their progress (fw_state)."),
    table(["Kind", "Announced", "Running", "State", "Since"], rows, "ota"),
    packages.length ? announce : h("p", { class: "empty", "data-testid": "packages-empty" }, EMPTY.packages),
    h("h2", {}, "Upload a package"), upload,
  ];
}

// Stream the device's telemetry into the live chart over the API websocket.
function startLive(number, container) {
  const keys = [], xs = [], cols = {};
  let plot = null, points = 0;
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/v1/ws?devices=${encodeURIComponent(number)}&access_token=${encodeURIComponent(session.access)}`;
  liveSocket = new WebSocket(url);
  liveSocket.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    if (ev.type === "status") {
      const s = document.querySelector("[data-testid=status] b");
      if (s) { s.textContent = ev.data.online ? "online" : "offline"; s.className = ev.data.online ? "ok" : "bad"; }
    }
    if (ev.type !== "telemetry") return;
    const fresh = Object.keys(ev.data).filter((k) => typeof ev.data[k] === "number" && !keys.includes(k));
    for (const k of fresh) { keys.push(k); cols[k] = xs.map(() => null); }
    xs.push(ev.ts / 1000);
    for (const k of keys) cols[k].push(typeof ev.data[k] === "number" ? ev.data[k] : null);
    if (xs.length > 500) { xs.shift(); keys.forEach((k) => cols[k].shift()); }
    points += 1;
    container.dataset.points = String(points);
    const data = [xs.slice(), ...keys.map((k) => cols[k].slice())];
    if (!plot || fresh.length) plot = chart(container, "live", keys, data);
    else plot.setData(data);
  };
  liveSocket.onclose = (e) => { if (e.code === 4001) showError("your session has ended: log in again"); };
}

// A JSON editor: the whole object, checked by the API (its error is shown).
function jsonEditor(testid, value, rows) {
  return h("textarea", { name: "json", "data-testid": testid, rows: rows || 18, cols: 90, spellcheck: "false", style: "width:100%;font-family:monospace" }, JSON.stringify(value, null, 2));
}
function parseJson(text, what) {
  try { return JSON.parse(text); } catch (e) { throw new Error(`${what} is not valid JSON: ${e.message}`); }
}

async function productPage(id) {
  const p = await api("GET", "/products/" + id);
  const f = form("edit-product", [
    field("Name", h("input", { name: "name", value: p.name, required: true })),
    field("Strict (refuse what the model does not describe)", h("select", { name: "strict" }, h("option", { value: "false", selected: !p.strict }, "no"), h("option", { value: "true", selected: p.strict }, "yes"))),
    h("div", { style: "width:100%" }, field("Thing model: telemetry, attributes (key, type number|integer|boolean|string|object, unit, min, max), events and commands (identifier, params)", jsonEditor("model", p.model))),
  ], "Save", async (v) => {
    await api("PUT", "/products/" + id, { name: v.name, strict: v.strict === "true", model: parseJson(v.json, "the model") });
    location.hash = "#/products";
  });
  view.replaceChildren(h("h1", {}, "Product ", p.name), f);
}

async function rulePage(id) {
  const r = await api("GET", "/alert-rules/" + id);
  const f = form("edit-rule", [
    field("Name", h("input", { name: "name", value: r.name, required: true })),
    field("Enabled", h("select", { name: "enabled" }, h("option", { value: "true", selected: r.enabled }, "yes"), h("option", { value: "false", selected: !r.enabled }, "no"))),
    h("div", { style: "width:100%" }, field("Rule: target, condition (all/any, key/op/value, rate_per_secs, no_data_secs, offline_secs), duration_secs, clear, severity, channels, command, message", jsonEditor("spec", r.spec))),
  ], "Save", async (v) => {
    await api("PUT", "/alert-rules/" + id, { ...parseJson(v.json, "the rule"), name: v.name, enabled: v.enabled === "true" });
    location.hash = "#/alerts";
  });
  view.replaceChildren(h("h1", {}, "Rule ", r.name, h("small", {}, ` runs on ${r.node}`)), f);
}

function alertTable(items, withAck) {
  return table(["Id", "Rule", "Device", "Severity", "Status", "Message", "Raised", withAck ? "" : "Cleared"], items.map((a) => [
    a.id, a.rule_name, h("a", { href: "#/devices/" + encodeURIComponent(a.device_number) }, a.device_number),
    h("span", { class: "sev-" + a.severity }, a.severity), a.status, a.message, time(a.raised_ms),
    withAck && a.status === "active" ? h("button", { type: "button", "data-testid": "ack-" + a.id, onclick: async () => {
      try { clearError(); await api("POST", `/alerts/${a.id}/ack`); await alertsPage(); } catch (e) { showError(e); }
    } }, "Acknowledge") : time(a.cleared_ms)]), withAck ? "open-alerts" : "alerts");
}

async function alertsPage() {
  const [open, history, rules, channels] = await Promise.all([
    api("GET", "/alerts?open=1&limit=200"), api("GET", "/alerts?limit=50"), api("GET", "/alert-rules?limit=200"), api("GET", "/channels?limit=200"),
  ]);
  const ops = ["=", "!=", ">", "<", ">=", "<="].map((o) => h("option", { value: o }, o));
  const create = form("new-rule", [
    field("Name", h("input", { name: "name", required: true })),
    field("Device", h("input", { name: "device", required: true })),
    field("Key", h("input", { name: "key", required: true, size: 8 })),
    field("Op", h("select", { name: "op" }, ops)),
    field("Value", h("input", { name: "value", required: true, size: 6 })),
    field("For (s)", h("input", { name: "duration", type: "number", min: 0, value: 0, size: 5 })),
    field("Clear below/above", h("input", { name: "clear", size: 6, placeholder: "(not condition)" })),
    field("Severity", h("select", { name: "severity" }, ["critical", "major", "minor", "warning", "info"].map((s) => h("option", { value: s, selected: s === "major" }, s)))),
    field("Channels", h("select", { name: "channel" }, h("option", { value: "" }, "—"), channels.items.map((c) => h("option", { value: c.id }, c.name)))),
  ], "Create rule", async (v) => {
    const value = isNaN(Number(v.value)) ? v.value : Number(v.value);
    const rule = { name: v.name, severity: v.severity, target: { device: v.device }, condition: { key: v.key, op: v.op, value }, duration_secs: Number(v.duration || 0), channels: v.channel ? [Number(v.channel)] : [] };
    if (v.clear !== "") {
      // Hysteresis: clear on the other side of a second threshold.
      rule.clear = { key: v.key, op: v.op.startsWith(">") ? "<" : ">", value: Number(v.clear) };
    }
    await api("POST", "/alert-rules", rule);
    await alertsPage();
  });
  const channel = form("new-channel", [
    field("Channel name", h("input", { name: "name", required: true })),
    field("Webhook URL", h("input", { name: "url", type: "url", required: true })),
    field("Secret (HMAC)", h("input", { name: "secret" })),
  ], "Add webhook channel", async (v) => {
    await api("POST", "/channels", { name: v.name, kind: "webhook", config: v.secret ? { url: v.url, secret: v.secret } : { url: v.url } });
    await alertsPage();
  });
  const mail = form("new-email-channel", [
    field("Channel name", h("input", { name: "name", required: true })),
    field("SMTP host", h("input", { name: "smtp_host", required: true })),
    field("Port", h("input", { name: "smtp_port", type: "number", value: 25, size: 5 })),
    field("From", h("input", { name: "from", type: "email", required: true })),
    field("To (comma-separated)", h("input", { name: "to", required: true })),
    field("TLS", h("select", { name: "tls" }, ["opportunistic", "starttls", "tls", "none"].map((t) => h("option", { value: t }, t)))),
    field("Username", h("input", { name: "username", autocomplete: "off" })),
    field("Password", h("input", { name: "password", type: "password", autocomplete: "new-password" })),
  ], "Add e-mail channel", async (v) => {
    const to = v.to.split(",").map((x) => x.trim()).filter(Boolean);
    const config = { smtp_host: v.smtp_host, smtp_port: Number(v.smtp_port || 25), from: v.from, to, tls: v.tls };
    if (v.username) Object.assign(config, { username: v.username, password: v.password });
    await api("POST", "/channels", { name: v.name, kind: "email", config });
    await alertsPage();
  });
  view.replaceChildren(h("h1", {}, "Alerts"),
    h("h2", {}, `Open (${open.total})`), alertTable(open.items, true),
    h("h2", {}, "Rules"), create,
    table(["Id", "Name", "Enabled", "Target", "Condition", "Clear", "For", "Severity", ""], rules.items.map((r) => [r.id, h("a", { href: "#/alerts/rules/" + r.id }, r.name), r.enabled ? "yes" : "no",
      JSON.stringify(r.spec.target), JSON.stringify(r.spec.condition), r.spec.clear ? JSON.stringify(r.spec.clear) : "", (r.spec.duration_secs || 0) + " s", r.spec.severity,
      h("span", {},
        h("button", { type: "button", class: "secondary", onclick: async () => {
          try { clearError(); await api("PUT", "/alert-rules/" + r.id, { ...r.spec, name: r.name, enabled: !r.enabled }); await alertsPage(); } catch (e) { showError(e); }
        } }, r.enabled ? "Disable" : "Enable"), " ",
        h("button", { type: "button", class: "secondary", onclick: async () => {
          if (!confirm(`Delete rule ${r.name} and its alerts?`)) return;
          try { clearError(); await api("DELETE", "/alert-rules/" + r.id); await alertsPage(); } catch (e) { showError(e); }
        } }, "Delete"))]), "rules"),
    h("h2", {}, "Channels"), channel, mail, table(["Id", "Name", "Kind", "Config"], channels.items.map((c) => [c.id, c.name, c.kind, JSON.stringify(c.config)]), "channels"),
    h("h2", {}, "History"), alertTable(history.items, false));
}

async function usersPage() {
  const me = session.me || {};
  const [users, roles, perms] = await Promise.all([api("GET", "/users?limit=200"), api("GET", "/roles?limit=200"), api("GET", "/permissions")]);
  const roleOptions = ["tenant_user", "tenant_admin"].concat(me.tenant === null ? ["system_admin"] : []).map((r) => h("option", { value: r }, r))
    .concat(roles.items.map((r) => h("option", { value: "custom:" + r.id }, r.name)));
  const create = form("new-user", [
    field("Username", h("input", { name: "username", required: true })),
    field("Password", h("input", { name: "password", type: "password", required: true, minlength: 8 })),
    field("Role", h("select", { name: "role" }, roleOptions)),
    me.tenant === null ? field("Tenant id", h("input", { name: "tenant_id", type: "number", min: 1, value: 1 })) : "",
  ], "Create user", async (v) => {
    const custom = v.role.startsWith("custom:");
    await api("POST", "/users", { username: v.username, password: v.password, role: custom ? "custom" : v.role, role_id: custom ? Number(v.role.slice(7)) : undefined, tenant_id: num(v.tenant_id) });
    await usersPage();
  });
  const roleForm = form("new-role", [
    field("Role name", h("input", { name: "name", required: true })),
    h("div", {}, perms.permissions.filter((p) => p !== "tenant:manage").map((p) => h("label", {}, h("input", { type: "checkbox", name: "perm:" + p }), p))),
  ], "Create role", async (v) => {
    const permissions = Object.keys(v).filter((k) => k.startsWith("perm:")).map((k) => k.slice(5));
    await api("POST", "/roles", { name: v.name, permissions });
    await usersPage();
  });
  view.replaceChildren(h("h1", {}, "Users and roles"), create,
    table(["Id", "Username", "Tenant", "Role", "Disabled", "Created", ""], users.items.map((u) => [u.id, u.username, u.tenant_id ?? "system", u.role, u.disabled ? "yes" : "no", time(u.created_ms),
      u.id === me.user_id ? "" : h("span", {},
        h("button", { type: "button", class: "secondary", onclick: async () => {
          try { clearError(); await api("PATCH", "/users/" + u.id, { disabled: !u.disabled }); await usersPage(); } catch (e) { showError(e); }
        } }, u.disabled ? "Enable" : "Disable"), " ",
        h("button", { type: "button", class: "secondary", onclick: async () => {
          // A new password ends the user's sessions on every node.
          const pw = prompt(`New password for ${u.username} (8+ characters)`);
          if (!pw) return;
          try { clearError(); await api("PATCH", "/users/" + u.id, { password: pw }); await usersPage(); } catch (e) { showError(e); }
        } }, "Set password"))]), "users"),
    h("h2", {}, "Custom roles"), roleForm, table(["Id", "Name", "Permissions", ""], roles.items.map((r) => [r.id, r.name, r.permissions.join(", "),
      h("span", {},
        h("button", { type: "button", class: "secondary", onclick: async () => {
          // Edit: the role's permissions, as a comma-separated list.
          const next = prompt(`Permissions of ${r.name} (comma-separated)`, r.permissions.join(", "));
          if (next === null) return;
          try { clearError(); await api("PUT", "/roles/" + r.id, { name: r.name, permissions: next.split(",").map((x) => x.trim()).filter(Boolean) }); await usersPage(); } catch (e) { showError(e); }
        } }, "Edit"), " ",
        h("button", { type: "button", class: "secondary", onclick: async () => {
          try { clearError(); await api("DELETE", "/roles/" + r.id); await usersPage(); } catch (e) { showError(e); }
        } }, "Delete"))]), "roles"));
}

async function clusterPage() {
  const [c, actors] = await Promise.all([ops("GET", "/cluster"), ops("GET", "/actors?limit=1000")]);
  const kinds = {};
  for (const a of actors.items || []) {
    const k = kinds[a.kind] || (kinds[a.kind] = { actors: 0, mailbox: 0 });
    k.actors += 1; k.mailbox += a.mailbox || 0;
  }
  view.replaceChildren(h("h1", {}, "Cluster"),
    table(["Node", "State", "Address", "Round trip (ms)", "Uptime (s)", "Sessions"], c.nodes.map((n) => [n.node, n.state, n.addr || "(this node)", n.rtt_ms ?? "", n.uptime_secs, n.sessions ? n.sessions.connected + " connected / " + n.sessions.all : ""]), "cluster"),
    h("h2", {}, "Actors"), table(["Kind", "Actors", "Mailbox"], Object.entries(kinds).map(([k, v]) => [k, v.actors, v.mailbox]), "actors"));
}

// ---- router --------------------------------------------------------------------------------
async function render() {
  if (liveSocket) { liveSocket.close(); liveSocket = null; }
  if (refreshTimer) { clearInterval(refreshTimer); clearTimeout(refreshTimer); refreshTimer = null; }
  clearError();
  const route = location.hash.replace(/^#/, "").split("?")[0] || "/";
  if (route === "/login" || !session.access) { if (route !== "/login") location.hash = "#/login"; else await loginPage(); return; }
  document.getElementById("top").hidden = false;
  const me = session.me;
  document.getElementById("who").textContent = me ? `${me.username} (${me.role})` : "";
  try {
    const parts = route.split("/").filter(Boolean);
    if (parts.length === 0) await dashboard();
    else if (parts[0] === "products" && parts.length === 1) await productsPage();
    else if (parts[0] === "products") await productPage(Number(parts[1]));
    else if (parts[0] === "alerts" && parts[1] === "rules") await rulePage(Number(parts[2]));
    else if (parts[0] === "devices" && parts.length === 1) await devicesPage();
    else if (parts[0] === "devices") await devicePage(decodeURIComponent(parts[1]), parts[2]);
    else if (parts[0] === "alerts") await alertsPage();
    else if (parts[0] === "users") await usersPage();
    else if (parts[0] === "cluster") await clusterPage();
    else view.replaceChildren(h("h1", {}, "Not found"));
  } catch (e) {
    showError(e);
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  try { await api("POST", "/auth/logout"); } catch { /* the session may be gone already */ }
  session.clear();
  location.hash = "#/login";
});
window.addEventListener("hashchange", render);
render();
