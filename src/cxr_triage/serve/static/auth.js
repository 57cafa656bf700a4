// cxr-triage page: the access token of `serve --token-file`. Asked for once (when the API first answers 401), kept in
// sessionStorage (gone with the tab), sent as "Authorization: Bearer …" with every API call. It is never a cookie,
// so a page on another site cannot make the browser send it. Without a token file nothing is ever asked.
"use strict";

(() => {
  const KEY = "cxr-triage-token";
  let waiting = [];

  function stored() {
    try {
      return sessionStorage.getItem(KEY);
    } catch {
      return null;
    }
  }

  function ask(refused) {
    const form = document.getElementById("token-form");
    form.hidden = false;
    document.getElementById("token-refused").hidden = !refused;
    document.getElementById("token-input").focus();
    return new Promise((resolve) => waiting.push(resolve));
  }

  function submitted(event) {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const token = input.value.trim();
    if (!token) return;
    try {
      sessionStorage.setItem(KEY, token);
    } catch {
      // storage refused (a private window): the token is asked for again on the next page load
    }
    input.value = "";
    document.getElementById("token-form").hidden = true;
    const resolve = waiting;
    waiting = [];
    resolve.forEach((r) => r(token));
  }

  // fetch() for the API: adds the token; on 401 asks for one (again) and retries with it
  async function cxrFetch(url, init = {}) {
    let token = stored();
    for (;;) {
      const headers = new Headers(init.headers || {});
      if (token) headers.set("Authorization", `Bearer ${token}`);
      const response = await fetch(url, { ...init, headers });
      if (response.status !== 401) return response;
      token = await ask(Boolean(token));
    }
  }

  window.cxrFetch = cxrFetch;
  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("token-form").addEventListener("submit", submitted);
  });
})();
