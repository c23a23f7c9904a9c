// A small, safe Markdown renderer for model answers: every piece of text is HTML-escaped before any markup is
// added, links are kept only for http(s) URLs, and no raw HTML from the model ever reaches the page.
// Supports fenced code blocks, inline code, headings, bold, italics, links, bullet and numbered lists,
// block quotes, horizontal rules and paragraphs. Exposes window.renderMarkdown(text) -> HTML string.
(function () {
  "use strict";

  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Inline markup on already escaped text; code spans are cut out first so nothing inside them is touched.
  function inline(raw) {
    var codes = [];
    var text = raw.replace(/`([^`\n]+)`/g, function (_, code) {
      codes.push("<code>" + escapeHtml(code) + "</code>");
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    text = escapeHtml(text);
    text = text.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, function (_, label, url) {
      return '<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
    });
    text = text.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    text = text.replace(/__([^_\n]+)__/g, "<strong>$1</strong>");
    text = text.replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>");
    text = text.replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
    return text.replace(/\u0000(\d+)\u0000/g, function (_, i) { return codes[Number(i)]; });
  }

  function renderMarkdown(source) {
    var lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    var html = [];
    var paragraph = [];
    var list = null; // {tag, items}

    function flushParagraph() {
      if (paragraph.length) {
        html.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
        paragraph = [];
      }
    }
    function flushList() {
      if (list) {
        html.push("<" + list.tag + ">" + list.items.map(function (item) {
          return "<li>" + inline(item) + "</li>";
        }).join("") + "</" + list.tag + ">");
        list = null;
      }
    }

    for (var i = 0; i < lines.length; i++) {
      var line = lines[i];
      var fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushParagraph(); flushList();
        var code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) { code.push(lines[i]); i++; }
        var cls = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
        html.push("<pre><code" + cls + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
        continue;
      }
      var heading = line.match(/^(#{1,6})\s+(.*)$/);
      var bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      var numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      var quote = line.match(/^\s*>\s?(.*)$/);
      if (heading) {
        flushParagraph(); flushList();
        var level = heading[1].length;
        html.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flushParagraph(); flushList();
        html.push("<hr>");
      } else if (bullet || numbered) {
        flushParagraph();
        var tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag: tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (quote) {
        flushParagraph(); flushList();
        html.push("<blockquote>" + inline(quote[1]) + "</blockquote>");
      } else if (!line.trim()) {
        flushParagraph(); flushList();
      } else {
        flushList();
        paragraph.push(line);
      }
    }
    flushParagraph(); flushList();
    return html.join("\n");
  }

  window.renderMarkdown = renderMarkdown;
  window.escapeHtml = escapeHtml;
})();
