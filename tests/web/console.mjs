// The web console end to end in Debian's Chromium (headless, driven by playwright-core):
// log in, create a product and a device, publish telemetry over MQTT and watch the live chart
// move, send a command, raise an alert and acknowledge it, look at users and the cluster, and
// check that another tenant's user does not see these devices. Screenshots of every page go to
// $SHOTS. Run by tests/web.rs, which starts the node and passes its addresses.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";

const { BASE, MQTT_PORT, ROOT_USER, ROOT_PASSWORD, OTHER_USER, OTHER_PASSWORD, SHOTS } = process.env;
const DEADLINE = 15000;
mkdirSync(SHOTS, { recursive: true });

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: ["--no-sandbox"] });
const failures = [];
try {
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  page.setDefaultTimeout(DEADLINE);
  page.on("pageerror", (e) => failures.push("page error: " + e.message));
  const shot = (name) => page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
  const publish = (token, payload) =>
    execFileSync("mosquitto_pub", ["-h", "127.0.0.1", "-p", MQTT_PORT, "-V", "mqttv5", "-q", "1", "-u", token, "-i", "web-test-" + token.slice(0, 6), "-t", "devices/telemetry", "-m", JSON.stringify(payload)]);
  const login = async (user, password) => {
    await page.goto(BASE + "/#/login");
    await page.fill("input[name=username]", user);
    await page.fill("input[name=password]", password);
    await page.click("form[data-testid=login] button[type=submit]");
    await page.waitForSelector("[data-testid=devices-total]");
  };

  // Log in (a wrong password is shown as an error first).
  await page.goto(BASE + "/");
  await page.waitForSelector("form[data-testid=login]");
  await shot("login");
  await page.fill("input[name=username]", ROOT_USER);
  await page.fill("input[name=password]", "wrong-password");
  await page.click("form[data-testid=login] button[type=submit]");
  await page.waitForSelector("#error:not([hidden])");
  if (!(await page.textContent("#error")).includes("wrong username or password")) failures.push("login error not shown");
  await login(ROOT_USER, ROOT_PASSWORD);
  await page.waitForSelector("table[data-testid=nodes]");
  await shot("dashboard");

  // A product with a thing model, then a device of it (its token is shown once).
  await page.goto(BASE + "/#/products");
  await page.fill("form[data-testid=new-product] input[name=name]", "thermo");
  await page.fill("form[data-testid=new-product] input[name=keys]", "temp:°C, hum:%");
  await page.click("form[data-testid=new-product] button[type=submit]");
  await page.waitForSelector("table[data-testid=products] >> text=thermo");
  // The thing model editor: a bad model is refused with the API's reason, a good one saved.
  await page.click("table[data-testid=products] >> text=thermo");
  await page.waitForSelector("[data-testid=model]");
  const model = JSON.parse(await page.inputValue("[data-testid=model]"));
  await page.fill("[data-testid=model]", "{ not json");
  await page.click("form[data-testid=edit-product] button[type=submit]");
  await page.waitForSelector("#error:not([hidden])");
  model.attributes = [{ key: "firmware", type: "string" }];
  model.commands = [{ identifier: "reboot", params: [] }];
  await page.fill("[data-testid=model]", JSON.stringify(model));
  await page.click("form[data-testid=edit-product] button[type=submit]");
  await page.waitForSelector("table[data-testid=products] >> text=thermo");
  await page.fill("form[data-testid=new-group] input[name=name]", "boiler rooms");
  await page.click("form[data-testid=new-group] button[type=submit]");
  await page.waitForSelector("table[data-testid=groups] >> text=boiler rooms");
  await shot("products");
  await page.goto(BASE + "/#/devices");
  await page.fill("form[data-testid=new-device] input[name=device_number]", "web-1");
  await page.fill("form[data-testid=new-device] input[name=name]", "Boiler room");
  await page.selectOption("form[data-testid=new-device] select[name=product_id]", { label: "thermo" });
  await page.selectOption("form[data-testid=new-device] select[name=group_id]", { label: "boiler rooms" });
  await page.click("form[data-testid=new-device] button[type=submit]");
  const token = (await page.textContent("[data-testid=token]")).trim();
  await page.waitForSelector("table[data-testid=devices] >> text=web-1");
  await shot("devices");

  // The device page, grouped in tabs. A new device says what is missing.
  await page.goto(BASE + "/#/devices/web-1");
  await page.waitForSelector("[data-testid=latest-empty]");
  await page.click("[data-testid=tab-commands]");
  await page.waitForSelector("[data-testid=commands-empty]");
  // Telemetry over MQTT moves the live chart.
  await page.click("[data-testid=tab-telemetry]");
  await page.waitForSelector("[data-testid=section-telemetry] [data-testid=live-chart]");
  await page.waitForTimeout(300); // the websocket connects (a missed first reading is published again below)
  let temp = 20;
  const end = Date.now() + DEADLINE;
  for (;;) {
    publish(token, { temp: temp, hum: 40 + temp / 10 });
    temp += 0.7;
    try {
      await page.waitForFunction(() => Number(document.querySelector("[data-testid=live-chart]").dataset.points) >= 3, null, { timeout: 400 });
      break;
    } catch {
      if (Date.now() > end) throw new Error("the live chart never moved");
    }
  }
  await shot("device-live");
  // A time axis in dates and times, not raw milliseconds.
  const axis = await page.textContent("[data-testid=live-chart] .u-axis");
  if (/\d{10,}/.test(axis || "")) failures.push("the live chart's time axis shows raw numbers: " + axis);
  await page.reload();
  await page.waitForSelector("[data-testid=history-chart] .uplot");
  // A command, with its status.
  await page.click("[data-testid=tab-commands]");
  await page.fill("form[data-testid=send-command] input[name=method]", "reboot");
  await page.click("form[data-testid=send-command] button[type=submit]");
  await page.waitForSelector("table[data-testid=commands] >> text=reboot");
  // Shared attributes set from the console reach the device's record.
  await page.click("[data-testid=tab-attributes]");
  await page.fill("form[data-testid=set-attributes] input[name=values]", '{"target": 21}');
  await page.click("form[data-testid=set-attributes] button[type=submit]");
  await page.waitForSelector("[data-testid=attributes] >> text=target");
  // mosquitto_pub came and went: the device was seen; its latest values are listed.
  await page.click("[data-testid=tab-overview]");
  await page.waitForSelector("table[data-testid=latest] >> text=temp");
  if (!(await page.textContent("[data-testid=status]")).includes("last seen")) failures.push("device status shows no last seen");
  await shot("device");
  // Firmware: upload a package, announce it; the device's firmware tab shows it announced.
  await page.click("[data-testid=tab-firmware]");
  await page.waitForSelector("[data-testid=packages-empty]");
  await page.waitForSelector("[data-testid=ota-empty]");
  await page.fill("form[data-testid=upload-package] input[name=title]", "boiler-fw");
  await page.fill("form[data-testid=upload-package] input[name=version]", "2.0.1");
  await page.setInputFiles("form[data-testid=upload-package] input[name=file]", { name: "boiler.bin", mimeType: "application/octet-stream", buffer: Buffer.alloc(5000, 7) });
  await page.click("form[data-testid=upload-package] button[type=submit]");
  await page.waitForSelector("form[data-testid=announce-package] select >> text=boiler-fw", { state: "attached" });
  await page.click("form[data-testid=announce-package] button[type=submit]");
  await page.waitForSelector("table[data-testid=ota] >> text=boiler-fw 2.0.1");
  await shot("device-firmware");
  // A second token, revoked again.
  await page.click("[data-testid=tab-credentials]");
  await page.click("form[data-testid=add-token] button[type=submit]");
  await page.waitForSelector("[data-testid=new-token] .token");
  await page.reload();
  await page.waitForSelector("table[data-testid=credentials] tbody tr:nth-child(2)");
  page.once("dialog", (d) => d.accept());
  await page.locator("table[data-testid=credentials] tbody tr:nth-child(2) button").click();
  await page.waitForFunction(() => document.querySelectorAll("table[data-testid=credentials] tbody tr").length === 1);
  // Disable (the API disconnects it everywhere) and enable again.
  await page.click("[data-testid=tab-overview]");
  await page.click("[data-testid=toggle-enabled]");
  await page.waitForSelector("[data-testid=status] >> text=disabled");
  await page.click("[data-testid=toggle-enabled]");
  await page.waitForSelector("[data-testid=toggle-enabled] >> text=Disable");

  // An alert rule made in the console; a hot reading raises it; acknowledge it.
  await page.goto(BASE + "/#/alerts");
  const rule = "form[data-testid=new-rule]";
  await page.fill(`${rule} input[name=name]`, "too hot");
  await page.fill(`${rule} input[name=device]`, "web-1");
  await page.fill(`${rule} input[name=key]`, "temp");
  await page.selectOption(`${rule} select[name=op]`, ">");
  await page.fill(`${rule} input[name=value]`, "30");
  await page.fill(`${rule} input[name=clear]`, "25");
  await page.selectOption(`${rule} select[name=severity]`, "critical");
  await page.click(`${rule} button[type=submit]`);
  await page.waitForSelector("table[data-testid=rules] >> text=too hot");
  const until = Date.now() + DEADLINE;
  for (;;) {
    publish(token, { temp: 35 });
    await page.goto(BASE + "/#/alerts?" + Date.now());
    if (await page.locator("table[data-testid=open-alerts] button").count()) break;
    if (Date.now() > until) throw new Error("no alert appeared");
    await page.waitForTimeout(200);
  }
  await page.click("table[data-testid=open-alerts] button");
  await page.waitForSelector("table[data-testid=open-alerts] >> text=acknowledged");
  await shot("alerts");
  // The rule editor: a compound condition saved as JSON.
  await page.click("table[data-testid=rules] >> text=too hot");
  await page.waitForSelector("[data-testid=spec]");
  const spec = JSON.parse(await page.inputValue("[data-testid=spec]"));
  spec.condition = { any: [spec.condition, { key: "hum", op: ">=", value: 90 }] };
  spec.duration_secs = 60;
  await page.fill("[data-testid=spec]", JSON.stringify(spec));
  await shot("rule-editor");
  await page.click("form[data-testid=edit-rule] button[type=submit]");
  await page.waitForSelector("table[data-testid=rules] >> text=60 s");

  await page.goto(BASE + "/#/users");
  await page.waitForSelector("table[data-testid=users]");
  await shot("users");
  await page.goto(BASE + "/#/cluster");
  await page.waitForSelector("table[data-testid=actors] >> text=alert");
  await shot("cluster");
  await page.goto(BASE + "/#/");
  await page.waitForSelector("[data-testid=alerts-open] >> text=1");
  await page.waitForSelector("table[data-testid=nodes]");
  if ((await page.textContent("[data-testid=devices-total] b")).trim() !== "2") failures.push("the dashboard counts " + (await page.textContent("[data-testid=devices-total] b")) + " devices, not 2");
  await shot("dashboard-with-alert");

  // The same pages on a phone.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(BASE + "/#/devices/web-1/telemetry");
  await page.waitForSelector("[data-testid=live-chart]");
  await shot("device-phone");
  await page.setViewportSize({ width: 1366, height: 900 });

  // Another tenant's user sees its own device, not these; nor may it open them.
  await page.click("#logout");
  await page.waitForSelector("form[data-testid=login]");
  await login(OTHER_USER, OTHER_PASSWORD);
  if ((await page.textContent("[data-testid=devices-total] b")).trim() !== "1") failures.push("tenant B's dashboard counts other tenants' devices");
  await page.goto(BASE + "/#/devices");
  await page.waitForSelector("table[data-testid=devices] >> text=other-dev");
  if (await page.locator("table[data-testid=devices] >> text=web-1").count()) failures.push("tenant B sees tenant A's device");
  await shot("other-tenant");
  // Empty lists say what to do.
  await page.goto(BASE + "/#/alerts");
  await page.waitForSelector("[data-testid=rules-empty]");
  if (!(await page.textContent("[data-testid=rules-empty]")).includes("create one")) failures.push("the empty rules list does not say what to do");
  await shot("empty-alerts");
  await page.goto(BASE + "/#/devices/web-1");
  await page.waitForSelector("#error:not([hidden])");
  const shown = await page.textContent("#error");
  if (!shown.includes("not found")) failures.push("another tenant's device page does not say not found: " + shown);
} catch (e) {
  failures.push(String(e && e.stack ? e.stack : e));
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
console.log("console test passed");
