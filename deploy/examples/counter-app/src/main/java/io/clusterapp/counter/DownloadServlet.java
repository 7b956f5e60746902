package io.clusterapp.counter;

import java.io.IOException;
import java.io.OutputStream;

import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;

/**
 * GET /counter/download?bytes=N streams N bytes (a repeating 0..250 pattern,
 * so a client can verify them) with a Content-Length; add {@code &chunked=1}
 * to leave the length out.
 */
public class DownloadServlet extends HttpServlet {
    private static final long serialVersionUID = 1L;
    private static final int BLOCK = 64 * 1024;

    @Override
    protected void doGet(HttpServletRequest req, HttpServletResponse resp) throws IOException {
        long total;
        try {
            total = Long.parseLong(req.getParameter("bytes"));
        } catch (NumberFormatException | NullPointerException e) {
            resp.sendError(HttpServletResponse.SC_BAD_REQUEST, "bytes=N required");
            return;
        }
        if (total < 0) {
            resp.sendError(HttpServletResponse.SC_BAD_REQUEST, "bytes must be >= 0");
            return;
        }
        resp.setContentType("application/octet-stream");
        resp.setHeader("X-Route", Route.jvmRoute());
        if (!"1".equals(req.getParameter("chunked"))) {
            resp.setContentLengthLong(total);
        }
        byte[] block = new byte[BLOCK];
        for (int i = 0; i < BLOCK; i++) {
            block[i] = (byte) (i % 251);
        }
        OutputStream out = resp.getOutputStream();
        long sent = 0;
        while (sent < total) {
            // Offset keeps the pattern continuous across blocks.
            int offset = (int) (sent % 251);
            int n = (int) Math.min(BLOCK - 251, total - sent);
            out.write(block, offset, n);
            sent += n;
        }
        out.flush();
    }
}
