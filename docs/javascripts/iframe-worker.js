// Search on pages opened from disk. Material's search runs in a Web Worker, and
// browsers refuse to start a worker from a file:// URL; on file:// this file replaces
// `Worker` with one that runs the worker's script in a hidden iframe of this page's
// origin: the script's `postMessage` hands its data to this page's listeners, and this
// page's `postMessage` is a "message" event in the iframe. Served over http, the real
// Worker stays. The file name keeps Material's offline plugin from adding its own shim
// from a CDN (the site loads nothing from other hosts). Written for this site.
(function () {
  "use strict";
  if (location.protocol !== "file:") {
    return;
  }

  function loadScript(doc, url) {
    return new Promise(function (resolve, reject) {
      var script = doc.createElement("script");
      script.src = url;
      script.onload = resolve;
      script.onerror = function () {
        reject(new Error("could not load " + url));
      };
      doc.head.appendChild(script);
    });
  }

  class FrameWorker extends EventTarget {
    constructor(url) {
      super();
      this.onmessage = null;
      this.onerror = null;
      this.queued = [];
      this.started = false;
      var frame = document.createElement("iframe");
      frame.hidden = true;
      frame.setAttribute("aria-hidden", "true");
      (document.body || document.documentElement).appendChild(frame);
      this.frame = frame;
      var scope = frame.contentWindow;
      var self = this;
      // the worker's side: its postMessage comes here, its importScripts loads in order
      scope.postMessage = function (data) {
        setTimeout(function () {
          self.receive(data);
        }, 0);
      };
      scope.importScripts = function () {
        var urls = Array.prototype.slice.call(arguments);
        return urls.reduce(function (done, next) {
          return done.then(function () {
            return loadScript(scope.document, new URL(next, script).href);
          });
        }, Promise.resolve());
      };
      var script = new URL(url, location.href).href;
      loadScript(scope.document, script).then(
        function () {
          self.started = true;
          self.queued.splice(0).forEach(function (data) {
            self.send(data);
          });
        },
        function (error) {
          var event = new ErrorEvent("error", { message: error.message });
          if (typeof self.onerror === "function") {
            self.onerror(event);
          }
          self.dispatchEvent(event);
        }
      );
    }

    receive(data) {
      var event = new MessageEvent("message", { data: data });
      if (typeof this.onmessage === "function") {
        this.onmessage(event);
      }
      this.dispatchEvent(event);
    }

    send(data) {
      var scope = this.frame.contentWindow;
      scope.dispatchEvent(new scope.MessageEvent("message", { data: data }));
    }

    postMessage(data) {
      if (!this.started) {
        this.queued.push(data);
        return;
      }
      var self = this;
      setTimeout(function () {
        self.send(data);
      }, 0);
    }

    terminate() {
      this.frame.remove();
    }
  }

  window.Worker = FrameWorker;
})();
