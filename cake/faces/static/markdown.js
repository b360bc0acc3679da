// A small, safe Markdown renderer for the model's answers (no dependencies).
//
// Safety: every piece of the source is HTML-escaped before any tag is added, and the only tags
// added are our own (p, br, pre, code, h1-h6, ul, ol, li, blockquote, strong, em, a). Links
// keep only http(s) and mailto targets. So an answer can never inject markup or script.
//
// Covers what chat answers use: fenced code blocks (an unclosed fence, as while streaming, runs
// to the end), inline code, headings, bullet and numbered lists, block quotes, bold, italics,
// links, paragraphs with line breaks.
"use strict";

(function (global) {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  // Inline markup of one line of text (raw, not yet escaped).
  function inline(text) {
    // Code spans first: their content is shown as it is, nothing inside is markup.
    return text
      .split(/(`[^`\n]+`)/)
      .map((part, i) => (i % 2 === 1 ? `<code>${escapeHtml(part.slice(1, -1))}</code>` : emphasis(escapeHtml(part))))
      .join("");
  }

  // Bold, italics and links, on text that is already escaped.
  function emphasis(html) {
    return html
      .replace(/\[([^\]\n]+)\]\(((?:https?:\/\/|mailto:)[^\s()]+)\)/g,
        (_, label, url) => `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`)
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?!\w)/g, "$1<em>$2</em>");
  }

  const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d{1,9}[.)]\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function isBlockStart(line) {
    return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line) || QUOTE.test(line);
  }

  function render(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let match;
      if ((match = FENCE.exec(line))) {
        const fence = match[1];
        const code = [];
        i += 1;
        while (i < lines.length && !lines[i].trim().startsWith(fence)) {
          code.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence (or past the end, while the answer is still streaming)
        const language = match[2] ? ` class="language-${escapeHtml(match[2])}"` : "";
        out.push(`<pre><code${language}>${escapeHtml(code.join("\n"))}</code></pre>`);
      } else if ((match = HEADING.exec(line))) {
        const level = match[1].length;
        out.push(`<h${level}>${inline(match[2])}</h${level}>`);
        i += 1;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const pattern = BULLET.test(line) ? BULLET : NUMBERED;
        const items = [];
        while (i < lines.length && (match = pattern.exec(lines[i]))) {
          items.push(`<li>${inline(match[1])}</li>`);
          i += 1;
        }
        const tag = pattern === BULLET ? "ul" : "ol";
        out.push(`<${tag}>${items.join("")}</${tag}>`);
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
          quoted.push(match[1]);
          i += 1;
        }
        out.push(`<blockquote>${render(quoted.join("\n"))}</blockquote>`);
      } else if (line.trim() === "") {
        i += 1;
      } else {
        const paragraph = [];
        while (i < lines.length && lines[i].trim() !== "" && !isBlockStart(lines[i])) {
          paragraph.push(inline(lines[i]));
          i += 1;
        }
        out.push(`<p>${paragraph.join("<br>")}</p>`);
      }
    }
    return out.join("\n");
  }

  global.cakeMarkdown = { render, escapeHtml };
})(window);
